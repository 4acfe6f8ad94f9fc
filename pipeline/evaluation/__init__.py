"""Evaluation machinery used by `pipeline.stages.evaluate` (`distill evaluate RECIPE`):

- answering.py    the base and tuned students' answers, batched and timed
- quality.py      headline quality figures per task kind, the names eval.gate may use
- routing.py      the policy from validation (temperature, gates, logistic weights, threshold), on test
- outputs.py      predictions.jsonl, router_policy.json, report.json/.md, PNGs, MLflow
- stats.py        bootstrap CIs over prompts, Clopper-Pearson bounds, examples needed for a target
- metrics.py      agreement, scikit-learn classification metrics, JSON field F1, chrF / ROUGE-L
- calibration.py  posterior temperature and logistic weights (fitted on validation), AUROC, reliability bins
- threshold.py    the routing threshold with a guarantee (fixed-sequence Clopper-Pearson), replay
- cost.py         $ per 1,000 requests: teacher-only, routed, student-only
- judge.py        pairwise LLM judge (both orders) through the teacher service
- heldout.py      the user's own held-out file (eval.file)
- gate.py         eval.gate: named figure >= bar, or the stage fails
- plots.py, render.py  the PNGs and report.md

What a threshold *means* (and which answers the hard gates escalate) is decided in one place,
pipeline/llm/policy.py (+ gates.py), which the server uses too.
"""
