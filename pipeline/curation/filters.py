"""Steps 2, 4 and 5: length in student tokens, answer format, self-consistency."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from pipeline.config import CurateConfig
from pipeline.curation.records import Removal, removal
from pipeline.task import Task

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


# ---------------------------------------------------------------- step 2: length


def count_tokens(examples: list[dict], tokenizer) -> None:
    """Annotate prompt/completion/full-sequence token counts, batched (one tokenizer call per
    side). The prompt is every turn the student reads (its `student` conversation: a system
    prompt it keeps, earlier turns); the full count renders the chat template training will use."""
    if not examples:
        return
    prompts = ["\n".join(m["content"] for m in ex["student"]) for ex in examples]
    answers = [ex["completion"] for ex in examples]
    conversations = [[*ex["student"], {"role": "assistant", "content": ex["completion"]}] for ex in examples]
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    s_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    for ex, p, a, s in zip(examples, p_ids, a_ids, s_ids):
        ex["prompt_tokens"], ex["completion_tokens"], ex["seq_tokens"] = len(p), len(a), len(s)


def step_length(examples: list[dict], cfg: CurateConfig, max_seq_len: int) -> tuple[list[dict], list[Removal]]:
    """Step 2: drop, never truncate, what is too short or too long (needs `count_tokens` first)."""
    kept, removed = [], []
    for ex in examples:
        reason, detail = _length_verdict(ex, cfg, max_seq_len)
        if reason:
            removed.append(removal(ex, reason, detail))
        else:
            kept.append(ex)
    return kept, removed


def _length_verdict(ex: dict, cfg: CurateConfig, max_seq_len: int) -> tuple[str, str]:
    p, a, s = ex["prompt_tokens"], ex["completion_tokens"], ex["seq_tokens"]
    if p < cfg.min_prompt_tokens:
        return "prompt_too_short", f"{p} < curate.min_prompt_tokens={cfg.min_prompt_tokens}"
    if cfg.max_prompt_tokens is not None and p > cfg.max_prompt_tokens:
        return "prompt_too_long", f"{p} > curate.max_prompt_tokens={cfg.max_prompt_tokens}"
    if a < cfg.min_completion_tokens:
        return "answer_too_short", f"{a} < curate.min_completion_tokens={cfg.min_completion_tokens}"
    if cfg.max_completion_tokens is not None and a > cfg.max_completion_tokens:
        return "answer_too_long", f"{a} > curate.max_completion_tokens={cfg.max_completion_tokens}"
    if s > max_seq_len:
        return "over_max_seq_len", f"{s} > train.max_seq_len={max_seq_len}"
    return "", ""


# ---------------------------------------------------------------- step 4: answer format


class FormatChecker:
    """The task file's answer rules: label set, JSON Schema, regex. `check` returns a reason or ''."""

    def __init__(self, task: Task, labels_only: bool):
        self.task = task
        self.labels_only = labels_only and task.kind == "classification"
        self.regex = re.compile(task.answer_regex) if task.answer_regex else None
        self.validator = None
        if task.output_schema is not None:
            from jsonschema.validators import validator_for

            self.validator = validator_for(task.output_schema)(task.output_schema)

    def check(self, sample: dict) -> tuple[str, str]:
        answer = sample["completion"]
        if self.labels_only and not sample["label"]:
            return "off_label", "not in the task's label set"
        if self.validator is not None:
            reason, detail = self._check_json(answer)
            if reason:
                return reason, detail
        if self.regex is not None and not self.regex.fullmatch(answer):
            return "regex_mismatch", f"does not match /{self.regex.pattern}/"
        return "", ""

    def _check_json(self, answer: str) -> tuple[str, str]:
        try:
            value = parse_json_answer(answer)
        except json.JSONDecodeError as err:
            return "invalid_json", err.msg
        assert self.validator is not None  # checked only when the task has an output schema
        error = next(iter(self.validator.iter_errors(value)), None)
        if error is not None:
            where = "/".join(map(str, error.absolute_path)) or "(root)"
            return "schema_mismatch", f"{where}: {error.message}"[:160]
        return "", ""


def parse_json_answer(answer: str) -> Any:
    """Parse a JSON answer, tolerating one surrounding Markdown code fence."""
    match = _FENCE.match(answer.strip())
    return json.loads(match.group(1) if match else answer)


def step_format(examples: list[dict], checker: FormatChecker) -> tuple[list[dict], list[Removal]]:
    """Step 4: drop samples whose answer breaks the task's format; an example goes when none is left.
    Invalid samples are remembered in `n_samples` so they count against self-consistency."""
    kept, removed = [], []
    for ex in examples:
        verdicts = [checker.check(s) for s in ex["samples"]]
        valid = [s for s, (reason, _) in zip(ex["samples"], verdicts) if not reason]
        ex.setdefault("n_samples", len(ex["samples"]))
        if valid:
            ex["samples"] = valid
            _adopt(ex, valid[0], checker.labels_only)
            kept.append(ex)
        else:
            reason, detail = verdicts[0]
            removed.append(removal(ex, reason, detail))
    return kept, removed


def _adopt(ex: dict, sample: dict, as_label: bool) -> None:
    """Make one sample the example's answer. With labels_only the label *is* the answer, so
    "Track order." and "track_order" train the student on the same target."""
    ex["completion"] = sample["label"] if as_label and sample["label"] else sample["completion"]
    ex["label"] = sample["label"] or ""
    ex["teacher_logprob"] = sample["logprob"]
    ex["finish_reason"] = sample["finish_reason"]


# ---------------------------------------------------------------- step 5: self-consistency


def answer_key(sample: dict, task: Task) -> str:
    """What 'the same answer' means: the label; canonical JSON for structured answers; else folded text."""
    if sample["label"]:
        return sample["label"]
    if task.output_schema is not None:
        try:
            return json.dumps(parse_json_answer(sample["completion"]), sort_keys=True, separators=(",", ":"))
        except json.JSONDecodeError:
            return sample["completion"].casefold()  # unreachable after step 4; compare as text
    return sample["completion"].casefold()


def step_consistency(
    examples: list[dict], task: Task, labels_only: bool, threshold: float
) -> tuple[list[dict], list[Removal]]:
    """Step 5: with several teacher samples per prompt keep the majority answer when its share of
    all samples (format failures included) reaches `threshold`; that share is the confidence."""
    kept, removed = [], []
    for ex in examples:
        total = ex.get("n_samples", len(ex["samples"]))
        if total <= 1:
            ex["confidence"] = 1.0
            kept.append(ex)
            continue
        keys = [answer_key(s, task) for s in ex["samples"]]
        # Majority answer; ties go to the answer whose best sample is most confident, then alphabetically.
        votes = Counter(keys)
        best_logprob = {k: max((_lp(s) for s, kk in zip(ex["samples"], keys) if kk == k)) for k in votes}
        winner = min(votes, key=lambda k: (-votes[k], -best_logprob[k], k))
        agreement = votes[winner] / total
        ex["confidence"] = agreement
        if agreement < threshold:
            removed.append(removal(ex, "low_agreement", f"{votes[winner]}/{total} samples agree < {threshold}"))
            continue
        labelled = [s["label"] for s in ex["samples"] if s["label"]]
        if task.kind == "classification" and labelled and not ex.get("label_probs"):
            # The samples' vote shares are the teacher's label distribution (train.soft_labels).
            ex["label_probs"] = {label: n / len(labelled) for label, n in Counter(labelled).items()}
        agreeing = [s for s, k in zip(ex["samples"], keys) if k == winner]
        _adopt(ex, min(agreeing, key=lambda s: (-_lp(s), s["id"])), labels_only and task.kind == "classification")
        kept.append(ex)
    return kept, removed


def _lp(sample: dict) -> float:
    return sample["logprob"] if sample["logprob"] is not None else float("-inf")
