"""The stage contract: every stage declares what it reads, and only that invalidates it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.config import Recipe, field_values
from pipeline.errors import DistillError
from pipeline.runner import STAGES, fingerprint
from pipeline.stages import Stage

ROOT = Path(__file__).resolve().parents[2]


def fingerprints(recipe: Recipe) -> dict[str, str]:
    return {s.NAME: fingerprint(s, recipe, {}) for s in STAGES}


def test_every_stage_meets_the_protocol_and_reads_real_fields():
    for stage in STAGES:
        assert isinstance(stage, Stage), stage.NAME
        field_values(Recipe(name="x"), stage.READS)  # raises on a path that is not a recipe field


def test_unknown_field_in_reads_is_refused():
    with pytest.raises(DistillError, match="train.epocs"):
        field_values(Recipe(name="x"), ("train.epocs",))


def test_serving_settings_and_planner_hints_invalidate_no_stage():
    base = Recipe(name="x")
    moved = base.model_copy(deep=True)
    moved.serve.port = 9999
    moved.serve.host = "0.0.0.0"
    moved.model.architecture = "mistral7b"
    moved.capture.cache = Path("/elsewhere/cache.sqlite")
    moved.teacher.concurrency = 32
    assert fingerprints(moved) == fingerprints(base)


@pytest.mark.parametrize(
    ("field", "value", "invalidated"),
    [
        ("train.lr", 1e-5, {"finetune"}),
        ("train.max_seq_len", 128, {"curate", "finetune"}),
        ("router.quality_target", 0.5, {"evaluate"}),
        ("eval.max_new_tokens", 3, {"evaluate"}),
        ("export.verify_prompts", 9, {"export"}),
        ("teacher.max_new_tokens", 3, {"capture", "evaluate"}),  # evaluate asks the teacher about eval.file
        ("model.base", "/some/model", {"curate", "finetune", "evaluate", "export"}),
    ],
)
def test_a_read_field_invalidates_exactly_the_stages_that_read_it(field, value, invalidated):
    base = Recipe(name="x")
    raw = base.model_dump(mode="json")
    section, key = field.split(".")
    raw[section][key] = value
    changed = Recipe.model_validate(raw)
    before, after = fingerprints(base), fingerprints(changed)
    assert {s for s in before if before[s] != after[s]} == invalidated


def test_stages_never_import_each_other():
    for path in (ROOT / "pipeline" / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m.startswith("pipeline.stages.")}, path.name


def test_export_formats_accepted_are_the_formats_that_exist():
    import typing

    from pipeline.config import ExportConfig
    from pipeline.export import FORMATS

    accepted = typing.get_args(typing.get_args(ExportConfig.model_fields["formats"].annotation)[0])
    assert set(accepted) == set(FORMATS)


def test_router_signals_accepted_are_the_signals_that_exist():
    import typing

    from pipeline.config import RouterConfig
    from pipeline.llm.policy import SIGNALS

    assert set(typing.get_args(RouterConfig.model_fields["signal"].annotation)) == set(SIGNALS)
