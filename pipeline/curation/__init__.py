"""Curation steps used by `pipeline.stages.curate`, one module per concern.

`steps.py` holds the ordered registry (`STEPS`): every step there has one signature,
`apply(examples, ctx: CurateContext) -> StepResult`, and the stage walks it in order.
The concern modules implement the steps with explicit arguments, each returning the
survivors and a list of `Removal`s naming the reason, so the card can count and show them:
`records` (the example and step 1), `filters` (length, format, consistency), `dedup`
(duplicates, decontamination), `pii`, `selection` (select, split), `card` (the dataset card).
"""
