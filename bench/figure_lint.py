"""The prose half of `bench/report.py --check`: every measured figure in a markdown file is backed.

The rule is stated in bench/report.py's docstring (what a figure is, what backs it, what is
exempt); this module applies it to one file's text and returns one line per problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

# A number with a unit that measurements are stated in. The ratio sign must touch the number
# ("1.5x"), so a shape such as "seq 2048 x batch 4" is not a figure.
_NUMBER = r"(?P<num>\d[\d,]*(?:\.\d+)?)"
_UNIT = (
    r"(?:(?P<ratio>[x×])(?!\w)|\s?(?P<unit>%|ms|s|sec|seconds?|min|minutes?|h|hours?|[A-Za-z]+/s|[KMGT]i?B"
    r"|nats?|points?|pts)(?![\w/]))"
)
_START = r"(?<![\w.$/])"
FIGURE = re.compile(_START + _NUMBER + _UNIT)
# A number that takes its unit from the figure it is paired with: "1.96 vs 1.34 ms", "+1.6 / +2.3 ms",
# "0.70-0.87x".
PAIRED = re.compile(_START + _NUMBER + r"(?=(?:\s?(?:vs\.?|/|–|-|to)\s?[+−-]?\d[\d,]*(?:\.\d+)?)+" + _UNIT + ")")
DOLLARS = re.compile(r"\$\s?" + _NUMBER)
# Not measurements: a confidence level ("95% CI"), and a memory size that names a GPU class
# ("A100 40/80 GB", "one 24 GB GPU").
EXEMPT = (
    re.compile(r"\d+(?:\.\d+)?\s?%\s*(?=CIs?\b|confidence\b|bootstrap\b|Clopper|one-sided|two-sided)"),
    re.compile(r"\b(?:A10G|A100|H100|H200|L4|L40S|T4|V100|A6000)(?:\s+\d+(?:/\d+)*\s?GB)?"),
    re.compile(r"\d+(?:/\d+)*\s?GB(?=\s+GPUs?\b)"),
)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
JSON_REF = re.compile(r"bench/results/[\w.-]+\.json")
# A backticked command: optional VAR=value assignments, then a program people run here, with arguments.
COMMAND = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:time|nice|make|distill|python3?|\.venv/bin/\S+|pytest|curl|git|bash|"
    r"accelerate|torchrun|hf)\s+\S"
)
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w.-]+):(?P<edge>start|end) -->")
FENCE = re.compile(r"^\s*(```|~~~)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s")
HEADING = re.compile(r"^#{1,6}\s")
TABLE_RULE = re.compile(r"^\s*\|?(?:\s*:?-{3,}:?\s*\|)+")


@dataclass
class Unit:
    """A paragraph, list item, heading or table row: the span a figure's source must be cited in."""

    line: int  # 1-based, of the unit's first line
    kind: str  # "paragraph" | "item" | "heading" | "row" | "header" (a table's column names: never checked)
    text: str
    caption: Unit | None = None  # a table row: the paragraph right above its table


@dataclass(frozen=True)
class Figure:
    text: str
    value: float
    decimals: int
    unit: str


def units_of(markdown: str) -> list[Unit]:
    """Split a markdown text into units, leaving out fenced code, HTML comments and generated blocks."""
    units: list[Unit] = []
    current: Unit | None = None
    fence = comment = generated = False
    table_caption: Unit | None = None
    in_table = False
    adjacent: Unit | None = None  # the last unit, while only blank lines follow it

    def close() -> None:
        nonlocal current, adjacent
        if current is not None:
            units.append(current)
            adjacent = current
        current = None

    for number, line in enumerate(markdown.splitlines(), start=1):
        marker = BLOCK.search(line)
        starts_comment = line.lstrip().startswith("<!--")
        if marker or generated or FENCE.match(line) or fence or comment or starts_comment:
            close()
            adjacent, in_table = None, False
            if marker:
                generated = marker["edge"] == "start"
            elif FENCE.match(line) and not generated and not comment:
                fence = not fence
            elif starts_comment or comment:
                comment = "-->" not in line
            continue
        if not line.strip():
            close()
            continue
        if line.lstrip().startswith("|"):
            if not in_table:
                close()
                in_table = True
                table_caption = adjacent if adjacent is not None and adjacent.kind != "heading" else None
            if TABLE_RULE.match(line) and units and units[-1].kind == "row":
                units[-1].kind = "header"  # column names, not figures
            else:
                units.append(Unit(number, "row", line, caption=table_caption))
            adjacent = None
            continue
        in_table = False
        if HEADING.match(line) or LIST_ITEM.match(line):
            close()
            current = Unit(number, "heading" if HEADING.match(line) else "item", line)
            if current.kind == "heading":
                close()
            continue
        if current is None:
            current = Unit(number, "paragraph", line)
        else:
            current.text += "\n" + line
    close()
    return units


def figures_in(text: str) -> list[Figure]:
    """The measured figures a unit states, outside code spans and link targets, minus the exempt ones."""
    prose = CODE_SPAN.sub(" ", text)
    prose = LINK_TARGET.sub("]", prose)
    for pattern in EXEMPT:
        prose = pattern.sub(" ", prose)
    found = [(m.start(), _figure(m, "$")) for m in DOLLARS.finditer(prose)]
    for pattern in (FIGURE, PAIRED):
        found += [(m.start(), _figure(m, m["unit"] or m["ratio"])) for m in pattern.finditer(prose)]
    return [fig for _, fig in sorted(found, key=lambda pair: pair[0])]


def _figure(m: re.Match, unit: str) -> Figure:
    num = m["num"].replace(",", "")
    decimals = len(num.split(".", 1)[1]) if "." in num else 0
    text = f"${m['num']}" if unit == "$" else f"{m['num']}{'' if unit in 'x×%' else ' '}{unit}"
    return Figure(text, float(num), decimals, unit)


def citations(text: str) -> tuple[list[str], list[str]]:
    """(bench/results JSON paths named, backticked commands) in a unit's raw text."""
    commands = [span for _, span in CODE_SPAN.findall(text) if COMMAND.match(span.strip())]
    return JSON_REF.findall(text), commands


def matches(fig: Figure, numbers: list[float]) -> bool:
    """Whether a number from the cited JSON, printed at the figure's precision, is the figure.
    A fraction may be printed as a percent, seconds as minutes, seconds as milliseconds."""
    tolerance = 0.5 * 10**-fig.decimals + 1e-9 * max(1.0, fig.value)
    scales = {"%": (1, 100), "min": (1, 1 / 60), "minutes": (1, 1 / 60), "ms": (1, 1000)}.get(fig.unit, (1,))
    return any(abs(abs(n) * s - fig.value) <= tolerance for n in numbers if math.isfinite(n) for s in scales)


def check(path: str, markdown: str, numbers_in: Callable[[str], list[float] | None]) -> list[str]:
    """One line per unbacked figure, missing citation target or unbalanced generated block in `markdown`.

    numbers_in(json_path) -> the numbers that JSON holds, or None when there is no such file."""
    problems = _check_blocks(path, markdown)
    for unit in units_of(markdown):
        figures = figures_in(unit.text) if unit.kind != "header" else []
        if not figures:
            continue
        jsons, commands = citations(unit.text)
        if not (jsons or commands) and unit.caption is not None:
            jsons, commands = citations(unit.caption.text)
        where = f"{path}:{unit.line}"
        if not (jsons or commands):
            listed = ", ".join(repr(f.text) for f in figures)
            problems.append(
                f"{where}: {listed}: measured, with no source in the "
                f"{'table row or its caption' if unit.kind == 'row' else unit.kind} (cite a "
                "bench/results/<name>.json or a backticked command such as `time make distill`)"
            )
            continue
        known: list[float] = []
        for ref in jsons:
            numbers = numbers_in(ref)
            if numbers is None:
                problems.append(f"{where}: cites {ref}, which does not exist")
            else:
                known += numbers
        if not jsons:
            continue  # the command printed it; nothing to compare against
        for fig in figures:
            if not matches(fig, known):
                problems.append(
                    f"{where}: {fig.text!r} is not in {', '.join(sorted(set(jsons)))} "
                    "(a unit that cites JSON quotes only that JSON)"
                )
    return problems


def _check_blocks(path: str, markdown: str) -> list[str]:
    problems, open_name, open_line = [], None, 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        m = BLOCK.search(line)
        if not m:
            continue
        if m["edge"] == "start":
            if open_name is not None:
                problems.append(
                    f"{path}:{number}: bench:{m['name']} starts inside bench:{open_name} (line {open_line})"
                )
            open_name, open_line = m["name"], number
        elif m["name"] != open_name:
            problems.append(f"{path}:{number}: bench:{m['name']}:end without its start")
        else:
            open_name = None
    if open_name is not None:
        problems.append(f"{path}:{open_line}: bench:{open_name}:start without its end")
    return problems
