"""Render bench/RESULTS.md and the generated blocks of README.md and docs/*.md from bench/results/*.json.

    .venv/bin/python bench/report.py [--results bench/results] [--out bench/RESULTS.md]
                                     [--readme README.md] [--docs docs | --no-readme] [--check]

`make bench` runs it last. Nothing is measured here: every number comes from a JSON a bench
wrote (figures.py names its figures; ratio = value / baseline from the same run). A JSON
written without an envelope (machine, load average, versions, command), such as
loop_demo.json, shows "not recorded" for what it lacks.

Generated blocks. In README.md and docs/*.md, the lines between `<!-- bench:NAME:start -->` and
`<!-- bench:NAME:end -->` are bench NAME's figure table (bench/results/NAME.json), rewritten by
this script; edit the JSON (rerun the bench), never the block.

--check writes nothing and exits 1, one line per problem, when RESULTS.md or a generated block
is out of date, or when a figure in README.md or docs/*.md is not backed. The rule:
- A *figure* is a number with a unit measurements are stated in: %, $, ms, s, min, h,
  anything per second (tok/s, req/s, prompts/s), KiB/MiB/GiB/MB/GB, nats, points, or a ratio
  written against the number (1.5x, 1.5×).
- Not figures: anything in a fenced code block (a transcript shown with its command), in an
  inline code span (a setting or value you type: `teacher.budget_usd=5`, `64 MiB`), in a
  generated block or an HTML comment; a confidence level ("95% CI", "95% confidence"); a
  memory size naming a GPU class ("A100 40/80 GB", "one 24 GB GPU"). Numbers without a unit
  (counts, versions, labels, examples, defaults such as 0.8) are never figures.
- Every figure must be backed in its *unit*: the paragraph, list item, heading or table row
  it is in (a table row may rely on the paragraph right above its table; a table's header row
  names columns and is not checked). Backed means the unit names a backticked command with
  its arguments (`time make distill`, `distill sweep ...`, `python bench/...`, `pytest ...`,
  `curl ...`) or a `bench/results/<name>.json` that exists.
- A unit that names a bench JSON quotes only that JSON: each of its figures must be one of
  the JSON's numbers at the precision printed (a fraction may be printed as a percent, seconds
  as min or ms), whatever command the unit also names. So a figure copied from an older run
  fails against the committed file; a figure from elsewhere goes in a unit of its own, with
  its command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import figure_lint  # noqa: E402
from figures import figures_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w.-]+):start -->.*?<!-- bench:(?P=name):end -->", re.S)
NOT_RECORDED = "not recorded"
ORDER = (
    "finetune",
    "finetune_profile",
    "local_teacher",
    "label_scoring",
    "label_capture",
    "label_serving",
    "label_evaluate",
    "trie_bound",
    "capture",
    "curate",
    "router",
    "router_soak",
    "loop_demo",
    "loop_sim",
    "loop_strategies",
    "cost",
    "teacher_prompt",
    "gpu",
)
WHAT = {
    "finetune": "CPU training throughput: the recipe's settings vs plain TRL SFTTrainer defaults",
    "finetune_profile": "where a CPU LoRA step goes, by op: TRL's loss vs the answer-only loss",
    "local_teacher": "local teacher: shared-prefix KV cache vs plain batched generation",
    "label_scoring": "label scoring over the label trie vs per-label buckets, the one-pass floor and generation",
    "label_capture": "a local teacher's capture with every label's log-likelihood vs plain capture",
    "label_serving": "serving a 77-label student by label posterior at concurrent clients: trie vs per-label buckets",
    "label_evaluate": "evaluate's tuned Banking77 student answering validation by label posterior: trie vs per-label buckets",
    "trie_bound": "how much of the label trie a pruned scorer could skip at a given probability bound",
    "capture": "capture against llama.cpp's OpenAI-compatible server; cached re-run",
    "curate": "curate stage on synthetic teacher records",
    "router": "router overhead over loopback HTTP (interleaved arms)",
    "router_soak": "router soak: valid, malformed, oversize, disconnecting and escalating requests at once",
    "loop_demo": "one turn of the loop (a one-round demo, measured before `make loop-sim`)",
    "loop_sim": "the loop simulated on a labelled dataset, round after round (`make loop-sim`)",
    "loop_strategies": "one round of the loop retrained four ways: warm start, from scratch, weighted, replay",
    "cost": "$ per 1,000 requests from an evaluate report, with the prices it assumes",
    "teacher_prompt": "the demo teacher's gold accuracy by prompt",
    "gpu": "GPU tier: QLoRA at the mistral7b shape, planner vs measured peak, the A10G-capped 7B export",
    "f16_reference": "F16 GGUF vs the merged model's teacher-forced log-probs, fp32 and bf16 references",
}


# ---------------------------------------------------------------- reading


def load(results: Path) -> list[tuple[str, dict]]:
    docs = [(p.stem, json.loads(p.read_text())) for p in results.glob("*.json")]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(docs, key=lambda d: (rank.get(d[0], len(ORDER)), d[0]))


def figures_of(name: str, data: dict) -> list[dict]:
    return data["figures"] if "figures" in data else figures_for(name, data)


def envelope_of(data: dict) -> dict:
    """The recorded envelope; a JSON written without one (loop_demo.json) gives only its command."""
    if "envelope" in data:
        return data["envelope"]
    command = data.get("command")
    return {
        "command": command if isinstance(command, str) else None,
        "quick": False,
        "started_at": None,
        "wall_s": None,
        "load_average": None,
        "machine": None,
        "versions": None,
        "git": None,
        "legacy": True,
    }


# ---------------------------------------------------------------- formatting


def _num(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return f"{v:,.0f}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def format_amount(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "fraction":
        return f"{v * 100:.1f}%"
    if unit == "$":  # three significant figures: the demo's $ per 1,000 requests are fractions of a cent
        return f"${v:,.2f}" if abs(v) >= 1 else f"${v:.3g}"
    return f"{_num(v)} {unit}".strip()


def format_value(f: dict) -> str:
    return format_amount(f["value"], f["unit"])


def format_baseline(f: dict) -> str:
    if f.get("baseline") is None:
        return "—"
    return f"{format_amount(f['baseline'], f['unit'])} ({f['baseline_name']})"


def format_ratio(f: dict) -> str:
    return "—" if f.get("ratio") is None else f"{f['ratio']:.3g}x"


def _load(env: dict) -> str:
    la = env.get("load_average")
    if not la:
        return NOT_RECORDED
    fmt = lambda v: NOT_RECORDED if v is None else " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    return f"{fmt(la.get('start'))} at start → {fmt(la.get('end'))} at end (1 / 5 / 15 min)"


def _machine(env: dict) -> str:
    m = env.get("machine")
    if not m:
        return NOT_RECORDED
    parts = [str(m[k]) for k in ("arch", "cpu", "os") if m.get(k)]
    cores = m.get("cores", m.get("cpus"))
    parts.append(f"{cores} cores" if cores else f"cores {NOT_RECORDED}")
    if "affinity" in m:
        parts.append(f"affinity {m['affinity']}, {'pinned' if m.get('pinned') else 'not pinned'}")
    else:
        parts.append(f"pinning {NOT_RECORDED}")
    for key, label in (
        ("ram_gib", "GiB RAM"),
        ("torch_threads", "torch threads"),
        ("threads", "torch threads"),
        ("torch_threads_a", "torch threads (arm a)"),
    ):
        if m.get(key) is not None:
            parts.append(f"{m[key]} {label}")
    parts.append(f"GPU {m['gpu']}" if m.get("gpu") else ("no GPU" if "gpu" in m else f"GPU {NOT_RECORDED}"))
    if m.get("python"):
        parts.append(f"python {m['python']}")
    return ", ".join(parts)


def _versions(env: dict) -> str:
    v = env.get("versions")
    wanted = ("torch", "transformers", "peft", "trl", "llama-cpp-python")
    if not v:
        return NOT_RECORDED
    shown = [f"{k} {v.get(k, NOT_RECORDED)}" for k in wanted]
    shown += [f"{k} {val}" for k, val in v.items() if k not in wanted and val != "not installed"]
    return ", ".join(shown)


def _git(env: dict) -> str:
    g = env.get("git")
    if not g or not g.get("commit"):
        return NOT_RECORDED
    return f"{g['commit'][:10]}{' (uncommitted changes)' if g.get('dirty') else ''}"


def _command(env: dict) -> str:
    return env.get("command") or NOT_RECORDED


# ---------------------------------------------------------------- rendering


def render_results(docs: list[tuple[str, dict]], results: Path) -> str:
    rel = _rel(results)
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python bench/report.py` from `{rel}/*.json`; do not edit by hand. `make bench`",
        "reruns every bench and regenerates this file and the generated tables in README.md and docs/",
        "(`BENCH_QUICK=1 make bench`: tiny sizes, written to `bench/results-quick/` instead).",
        "",
        "The machines are shared and noisy: compare ratios (value / a baseline measured in the same",
        "run) rather than absolute figures, and read each bench's load average. Each bench ran on its",
        "own, at its own time; results written before the scripts recorded an envelope say",
        f'"{NOT_RECORDED}" for what they lack.',
        "",
        *render_headline(docs),
    ]
    for name, data in docs:
        env = envelope_of(data)
        figures = figures_of(name, data)
        command = _command(env)
        lines += [
            f"## {name}: {WHAT.get(name, name)}",
            "",
            f"`{rel}/{name}.json`{' — **quick run** (tiny sizes, not a measurement)' if env.get('quick') else ''}",
            "",
            f"- command: `{command}`",
            f"- run: started {env.get('started_at') or NOT_RECORDED}, "
            f"wall {format_amount(env['wall_s'], 's') if env.get('wall_s') is not None else NOT_RECORDED}",
            f"- machine: {_machine(env)}",
            f"- load average: {_load(env)}",
            f"- versions: {_versions(env)}",
            f"- git: {_git(env)}",
            "",
            "| figure | value | baseline | ratio | better | note | command |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in figures:
            lines.append(
                f"| {f['name']} | {format_value(f)} | {format_baseline(f)} | {format_ratio(f)} | "
                f"{f['better']} | {f.get('note') or ''} | `{command}` |"
            )
        lines.append("")
    return "\n".join(lines)


def render_headline(docs: list[tuple[str, dict]]) -> list[str]:
    lines = [
        "## Headline figures",
        "",
        "| bench | figure | value | baseline (same run) | ratio | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, data in docs:
        for f in figures_of(name, data):
            if f.get("headline"):
                lines.append(
                    f"| {name} | {f['name']} | {format_value(f)} | {format_baseline(f)} | "
                    f"{format_ratio(f)} | {f.get('note') or ''} |"
                )
    return lines + [""]


def render_block(name: str, data: dict, results: Path, results_md: Path, doc: Path) -> str:
    """A doc's generated block for bench `name`: every figure, then where they come from."""
    rel = _rel(results)
    env = envelope_of(data)
    link = Path(os.path.relpath(results_md.resolve(), doc.resolve().parent)).as_posix()
    lines = [
        f"<!-- bench:{name}:start -->",
        f"<!-- generated by bench/report.py from {rel}/{name}.json; rerun the bench, do not edit -->",
        "",
        "| figure | value | baseline (same run) | ratio | note |",
        "|---|---|---|---|---|",
    ]
    for f in figures_of(name, data):
        lines.append(
            f"| {f['name']} | {format_value(f)} | {format_baseline(f)} | {format_ratio(f)} | {f.get('note') or ''} |"
        )
    started = env.get("started_at") or "date not recorded"
    lines += [
        "",
        f"`{rel}/{name}.json`: `{_command(env)}`; {started}; load average {_load(env)}; "
        f"machine and versions in [{Path(link).name}]({link}).",
        f"<!-- bench:{name}:end -->",
    ]
    return "\n".join(lines)


def render_doc(text: str, doc: Path, docs: dict[str, dict], results: Path, results_md: Path) -> str:
    """The doc with each generated block re-rendered (unknown bench names are left for the check)."""

    def block(m: re.Match) -> str:
        name = m["name"]
        return render_block(name, docs[name], results, results_md, doc) if name in docs else m.group(0)

    return BLOCK.sub(block, text)


def unknown_blocks(text: str, doc: Path, docs: dict[str, dict], results: Path) -> list[str]:
    return [
        f"{_rel(doc)}: bench:{m['name']} names no {_rel(results)}/{m['name']}.json"
        for m in BLOCK.finditer(text)
        if m["name"] not in docs
    ]


def numbers_in(ref: str) -> list[float] | None:
    """Every number a cited bench JSON holds (in strings too), and the figures derived from it."""
    path = ROOT / ref
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    numbers: list[float] = []

    def walk(node: object) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, (int, float)):
            numbers.append(float(node))
        elif isinstance(node, str):
            numbers.extend(float(n) for n in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", node))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    for f in figures_of(path.stem, data):
        numbers += [v for v in (f["value"], f["baseline"], f["ratio"]) if v is not None]
    return numbers


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: RESULTS.md next to --results' folder (bench/RESULTS.md for bench/results)",
    )
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument(
        "--docs", type=Path, default=None, help="folder of *.md pages (default: docs/ next to --readme)"
    )
    parser.add_argument("--no-readme", action="store_true", help="leave README.md and docs/ alone (quick runs)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when anything is stale or a figure in the README or docs is not backed",
    )
    args = parser.parse_args(argv)

    docs = load(args.results)
    if not docs:
        raise SystemExit(f"no *.json in {args.results}")
    out = args.out or (
        args.results.parent / "RESULTS.md" if args.results.name == "results" else args.results / "RESULTS.md"
    )
    targets = {out: render_results(docs, args.results) + "\n"}
    problems: list[str] = []
    if not args.no_readme:
        by_name = dict(docs)
        docs_dir = args.docs or args.readme.parent / "docs"
        pages = [args.readme, *sorted(docs_dir.glob("*.md"))]
        for page in pages:
            text = page.read_text()
            targets[page] = render_doc(text, page, by_name, args.results, out)
            problems += unknown_blocks(text, page, by_name, args.results)
            problems += figure_lint.check(_rel(page), text, numbers_in)
    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {_rel(p)} (run python bench/report.py)")
        for problem in problems:
            print(problem)
        return 1 if stale or problems else 0
    for p in stale:
        p.write_text(targets[p])
        print(f"wrote {_rel(p)}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
