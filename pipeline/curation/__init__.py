"""Curation steps used by `pipeline.stages.curate`, one module per concern.

Every step takes a list of examples and returns `(kept, removed)`, where `removed` is a
list of `Removal`s naming the reason, so the stage can count and show what each step did.
"""
