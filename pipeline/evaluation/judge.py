"""LLM-as-judge, pairwise: is the tuned student's free-text answer better than the teacher's?

    distill evaluate RECIPE eval.judge.spec=openai:gpt-4o-mini     (a free-text task)

Any teacher spec the capture stage accepts can judge (`eval.judge` is a teacher section), and
it is asked through the teacher service, so verdicts are cached, costed and budgeted like
captured answers. Each pair is judged in both orders (student first, then teacher first) to
cancel position bias: the student wins a prompt when its net verdict over the two orders is
positive, loses when negative, ties otherwise (including one win and one loss: the judge
only preferred a position).
"""

from __future__ import annotations

import re

from pipeline.stats import Figure, mean_figure

DEFAULT_RUBRIC = (
    "Judge which answer better does what the user asked: correct, complete, relevant and concise. "
    "Ignore the order in which the answers are shown and their length."
)
VERDICTS = ("A", "B", "tie")


def judge_conversation(prompt: str, first: str, second: str, rubric: str) -> list[dict]:
    system = f"You are an impartial judge. {rubric} Reply with exactly one word: A, B or tie."
    user = (
        f"User request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
        "Which answer is better? Reply A, B or tie."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> str | None:
    """The judge's first word: A, B or tie (case-insensitive); anything else is no verdict."""
    match = re.match(r"\W*(answer\s+)?(a|b|tie)\b", text.strip(), flags=re.IGNORECASE)
    if not match:
        return None
    word = match.group(2).lower()
    return "tie" if word == "tie" else word.upper()


def outcome(student_first: str | None, teacher_first: str | None) -> str:
    """Combine the two orders into the student's win / tie / loss on this prompt."""
    net = {"A": 1, "B": -1}.get(student_first or "", 0) + {"B": 1, "A": -1}.get(teacher_first or "", 0)
    return "win" if net > 0 else "loss" if net < 0 else "tie"


def pairwise(
    service, prompts: list[str], student: list[str], teacher: list[str], rubric: str | None = None
) -> tuple[list[str], list[tuple[str | None, str | None]]]:
    """Per prompt: the student's outcome, and the raw verdicts (student first, teacher first)."""
    rubric = rubric or DEFAULT_RUBRIC
    n = len(prompts)
    convs = [judge_conversation(p, s, t, rubric) for p, s, t in zip(prompts, student, teacher)]
    convs += [judge_conversation(p, t, s, rubric) for p, s, t in zip(prompts, student, teacher)]
    answers = service.answer_sync(convs)
    verdicts = [
        (
            parse_verdict(answers[i].text) if not answers[i].error else None,
            parse_verdict(answers[n + i].text) if not answers[n + i].error else None,
        )
        for i in range(n)
    ]
    return [outcome(a, b) for a, b in verdicts], verdicts


def judge_figures(
    outcomes: list[str], verdicts: list[tuple[str | None, str | None]], reps: int, seed: int
) -> dict[str, Figure]:
    """Win / tie / loss rates of the student vs the teacher, the share of the judge's verdicts
    that were parseable, and how often it contradicted itself when the order was swapped."""
    # Consistent: the same answer preferred (or a tie) whichever position it was shown in.
    consistent = [(a, b) in (("A", "B"), ("B", "A"), ("tie", "tie")) for a, b in verdicts]
    return {
        "judge_win_rate": mean_figure([o == "win" for o in outcomes], reps, seed),
        "judge_tie_rate": mean_figure([o == "tie" for o in outcomes], reps, seed),
        "judge_loss_rate": mean_figure([o == "loss" for o in outcomes], reps, seed),
        "judge_not_worse_rate": mean_figure([o != "loss" for o in outcomes], reps, seed),
        "judge_parse_rate": mean_figure([v is not None for pair in verdicts for v in pair], reps, seed),
        "judge_consistency": mean_figure(consistent, reps, seed),
    }
