"""The curate steps in order, each behind one signature: `apply(examples, ctx) -> StepResult`.

`STEPS` is the pipeline: `pipeline.stages.curate.curate_records` walks it in order, skipping a
step whose `enabled(ctx)` is false, and the card lists the steps that ran in the same order.
Adding a step is one function with the common signature and one `CurateStep` in `STEPS`.

The concern modules (records, filters, dedup, pii, selection) keep their explicit-argument
functions, which the unit tests call directly; the adapters here only unpack the context.
The split and the test-vs-train decontamination act on splits, not on one list of examples,
so they are not registry steps: `split` and `decontaminate_test` below run after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import CurateConfig, Recipe
from pipeline.conversation import StudentInput, StudentView, student_messages
from pipeline.curation.dedup import NgramIndex, step_decontaminate, step_exact_dedupe, step_near_dedupe
from pipeline.curation.filters import FormatChecker, count_tokens, step_consistency, step_format, step_length
from pipeline.curation.pii import scrub_records
from pipeline.curation.records import Removal, step_normalise, student_text
from pipeline.curation.selection import step_select, stratified_split
from pipeline.task import Task

SPLIT = "split"
TEST_DECONTAMINATION = "decontaminate (test vs train)"


@dataclass(frozen=True)
class CurateContext:
    """Everything a step may read, built once per run from the recipe and the stage's inputs."""

    task: Task
    cfg: CurateConfig
    max_seq_len: int  # train.max_seq_len: the length filter drops longer sequences
    tokenizer: Any  # the student's (transformers) tokenizer with its chat template
    eval_conversations: tuple[list[dict], ...] | None = None  # eval.file's conversations, normalised, if any
    frozen_test: tuple[dict, ...] | None = None  # curate.frozen_test's examples: this run's test split as is
    frozen_validation: tuple[dict, ...] | None = None  # curate.frozen_validation's, likewise
    student_input: StudentInput = "auto"  # model.student_input, as the recipe asks it
    view: StudentView | None = None  # ... resolved over this run's records (curate_records sets it)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def shape(self):
        if self.view is None:
            raise RuntimeError("the student view is resolved before the steps run (curate_records)")
        return self.view.shape

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        task: Task,
        tokenizer: Any,
        eval_conversations: list[list[dict]] | None,
        frozen_test: list[dict] | None = None,
        frozen_validation: list[dict] | None = None,
    ) -> CurateContext:
        prompts = tuple(eval_conversations) if eval_conversations is not None else None
        return cls(
            task,
            recipe.curate,
            recipe.train.max_seq_len,
            tokenizer,
            prompts,
            tuple(frozen_test) if frozen_test is not None else None,
            tuple(frozen_validation) if frozen_validation is not None else None,
            recipe.model.student_input,
        )

    @property
    def frozen(self) -> tuple[dict, ...]:
        """The frozen splits' examples: none of them, nor a near-duplicate, may train."""
        return (self.frozen_test or ()) + (self.frozen_validation or ())


@dataclass
class StepResult:
    """What one step did: the survivors, the removals (with reasons), the examples it changed
    without removing them (PII), and what only some steps report."""

    kept: list[dict]
    removed: list[Removal] = field(default_factory=list)
    changed: list[Removal] = field(default_factory=list)
    pii_counts: Counter | None = None  # replacements per PII type; the card shows them when set
    notes: list[str] = field(default_factory=list)  # warnings for the card and the manifest


StepFn = Callable[[list[dict], CurateContext], StepResult]


def _always(ctx: CurateContext) -> bool:
    return True


@dataclass(frozen=True)
class CurateStep:
    """A named step of the registry; `name` is the row the card shows."""

    name: str
    apply: StepFn
    enabled: Callable[[CurateContext], bool] = _always


# ---------------------------------------------------------------- adapters (one per step)


def normalise(records: list[dict], ctx: CurateContext) -> StepResult:
    """Capture records in, working examples out (only the PII scrub, on records, may come before)."""
    return StepResult(*step_normalise(records, ctx.task, ctx.cfg, ctx.shape))


def length(examples: list[dict], ctx: CurateContext) -> StepResult:
    # The counts stay on the examples: the card's length histograms and table read them.
    count_tokens(examples, ctx.tokenizer)
    return StepResult(*step_length(examples, ctx.cfg, ctx.max_seq_len))


def exact_dedupe(examples: list[dict], ctx: CurateContext) -> StepResult:
    return StepResult(*step_exact_dedupe(examples))


def near_dedupe(examples: list[dict], ctx: CurateContext) -> StepResult:
    cfg = ctx.cfg
    return StepResult(*step_near_dedupe(examples, cfg.near_dup_threshold, cfg.minhash_perm, ctx.seed))


def answer_format(examples: list[dict], ctx: CurateContext) -> StepResult:
    return StepResult(*step_format(examples, FormatChecker(ctx.task, ctx.cfg.labels_only)))


def consistency(examples: list[dict], ctx: CurateContext) -> StepResult:
    cfg = ctx.cfg
    return StepResult(*step_consistency(examples, ctx.task, cfg.labels_only, cfg.consistency_threshold))


def pii(records: list[dict], ctx: CurateContext) -> StepResult:
    """On the capture records, before anything can show or keep their raw text."""
    kept, changed, counts = scrub_records(records)
    return StepResult(kept, changed=changed, pii_counts=counts)


def eval_decontaminate(examples: list[dict], ctx: CurateContext) -> StepResult:
    texts = ("\n".join(m["content"] for m in student_messages(c, ctx.shape)) for c in ctx.eval_conversations or ())
    reference = NgramIndex(texts, ctx.cfg.decontam_ngram)
    return StepResult(
        *step_decontaminate(examples, reference, ctx.cfg.decontam_overlap, "eval_overlap", "the eval file")
    )


def frozen_decontaminate(examples: list[dict], ctx: CurateContext) -> StepResult:
    """Nothing that is, or nearly is, a frozen test or validation prompt may train (an escalated
    copy of one included)."""
    reference = NgramIndex((student_text(ex) for ex in ctx.frozen), ctx.cfg.decontam_ngram)
    return StepResult(
        *step_decontaminate(examples, reference, ctx.cfg.decontam_overlap, "frozen_test_overlap", "a frozen split")
    )


def select(examples: list[dict], ctx: CurateContext) -> StepResult:
    kept, removed, notes = step_select(
        examples, ctx.cfg.target_size, ctx.cfg.embeddings, ctx.cfg.selection, ctx.cfg.seed
    )
    return StepResult(kept, removed, notes=notes)


# Order matters: pii comes first, so no step's removed examples (shown in the card) and no
# output ever hold raw personal data; dedupe before format merges numbered samples so
# consistency can vote on them; decontamination and selection see the final text.
NORMALISE = "normalise"
STEPS: tuple[CurateStep, ...] = (
    CurateStep("pii scrub", pii, enabled=lambda ctx: ctx.cfg.pii),
    CurateStep(NORMALISE, normalise),
    CurateStep("length", length),
    CurateStep("exact dedupe", exact_dedupe),
    CurateStep("near-dup (MinHash)", near_dedupe),
    CurateStep("answer format", answer_format),
    CurateStep("self-consistency", consistency),
    CurateStep("decontaminate (eval file)", eval_decontaminate, enabled=lambda ctx: ctx.eval_conversations is not None),
    CurateStep("decontaminate (frozen splits)", frozen_decontaminate, enabled=lambda ctx: bool(ctx.frozen)),
    CurateStep("select", select),
)


# ---------------------------------------------------------------- after the registry: splits


def split(examples: list[dict], ctx: CurateContext) -> dict[str, list[dict]]:
    """Stratified split with the recipe's seed (removes nothing). A frozen split is used as it was,
    and the examples make the other splits only."""
    validation = 0.0 if ctx.frozen_validation is not None else ctx.cfg.split.validation
    test = 0.0 if ctx.frozen_test is not None else ctx.cfg.split.test
    splits = stratified_split(examples, validation, test, ctx.seed)
    for name, frozen in (("validation", ctx.frozen_validation), ("test", ctx.frozen_test)):
        if frozen is not None:
            splits[name] = [dict(ex) for ex in frozen]
            count_tokens(splits[name], ctx.tokenizer)  # the card's length table reads them
    return splits


def decontaminate_test(splits: dict[str, list[dict]], ctx: CurateContext) -> StepResult:
    """Test prompts overlapping train are dropped from test (train and validation keep theirs).
    A frozen test split is never changed: train was decontaminated against it instead."""
    if ctx.frozen_test is not None:
        return StepResult(list(splits["test"]))
    train_index = NgramIndex((student_text(ex) for ex in splits["train"]), ctx.cfg.decontam_ngram)
    return StepResult(
        *step_decontaminate(splits["test"], train_index, ctx.cfg.decontam_overlap, "test_train_overlap", "train")
    )
