"""The one completion type: what a student, a local or remote teacher, or an upstream API answered.

Used by local generation, every teacher, the teacher cache, the router's backends and the
routing policy, so a confidence read in evaluation is the same number the router reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Completion:
    text: str
    source: str = ""  # which system answered: "student", "local:<ref>", "openai:<model>", ...
    prompt_tokens: int | None = None  # None: the producer did not say (a provider without usage)
    completion_tokens: int | None = None
    token_ids: list[int] | None = None
    # Log-probabilities of the answer's tokens (of the EOS when the answer is empty), when known.
    token_logprobs: list[float] | None = None
    finish_reason: str = "stop"  # stop | length | error
    latency_ms: int = 0
    cost_usd: float = 0.0
    error: str | None = None
    created_at: str = field(default_factory=_now)
    # Classification: log-likelihood of each label's full token sequence (EOS included) after
    # the prompt, from one teacher-forced pass (pipeline/llm/scoring.py); the policy turns it
    # into the label posterior. None: not scored.
    label_logprobs: dict[str, float] | None = None
    # Structured (JSON) answers: each top-level field's summed log-probability of its value's
    # tokens (pipeline/llm/structured.py field_logprobs); the field_prob signal reads the weakest.
    field_logprobs: dict[str, float] | None = None

    @property
    def mean_logprob(self) -> float | None:
        """Average log-probability of the chosen tokens: the confidence signal policies read."""
        values = [v for v in self.token_logprobs or [] if math.isfinite(v)]
        return sum(values) / len(values) if values else None

    @property
    def min_logprob(self) -> float | None:
        """Lowest log-probability among the chosen tokens: one doubtful token decides, so longer
        answers score lower (tests/llm/test_policy_fields.py shows the bias; p10_logprob has none)."""
        values = [v for v in self.token_logprobs or [] if math.isfinite(v)]
        return min(values) if values else None

    @property
    def stopped(self) -> bool:
        """Ended by itself (EOS or a stop sequence) rather than at the token limit or an error."""
        return self.finish_reason == "stop"

    @property
    def usage(self) -> dict[str, int]:
        """Token counts the producer reported; empty when it reported none."""
        known = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return {k: v for k, v in known.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        return cls(**data)
