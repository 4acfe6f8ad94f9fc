"""Recipe search: one trial per combination of dotted overrides, the best chosen on validation.

    distill sweep RECIPE train.lr=3e-4,1e-3 train.epochs=2,3     (make sweep RECIPE=... ARGS="...")

Each `key=v1,v2` is an axis (the same `key=value` override `distill run` takes, values split on
commas outside brackets, so `train.lora.targets=[q_proj,v_proj],all-linear` is two values); the
trials are their cartesian product. Capture and curate run once, in the recipe's own run folder
(runs/<recipe>/, skipped when unchanged). Each trial has its own folder,
runs/<recipe>/sweeps/<sweep>/<trial>/: the shared capture and curate are hard-linked into it when
the trial's fingerprint for them is the same (a trial that changes a curate field curates its own),
then finetune and evaluate run there.

MLflow: one parent run per sweep (its id kept in <sweep>/sweep.json, so a rerun continues it),
one child run per trial (tag mlflow.parentRunId) holding its stages' runs. The parent gets the
comparison table (results.md), a plot (results.png) and the winner's tags.

The winner is the trial whose tuned student agrees most with the teacher on the **validation**
split (evaluate's tuned_validation_agreement: its tuned student's answers, as served); test stays the
untouched report of the chosen recipe. Ties go to the earlier trial of the grid. A rerun skips
every trial already scored under this parent whose stages are unchanged (fingerprints).
"""
