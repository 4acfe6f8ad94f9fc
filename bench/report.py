"""Render bench/RESULTS.md, and the README's Performance block, from bench/results/*.json.

    .venv/bin/python bench/report.py [--results bench/results] [--out bench/RESULTS.md]
                                     [--readme README.md | --no-readme] [--check]

`make bench` runs it last. Nothing is measured here: every number comes from a JSON a bench
wrote (figures.py names its figures; ratio = value / baseline from the same run). JSON written
before the scripts recorded an envelope (machine, load average, versions, command) shows
"not recorded" for what it lacks, or what the older JSON itself carried. The README block
between `<!-- bench:start -->` and `<!-- bench:end -->` holds the headline figures.
--check: change nothing, exit 1 when RESULTS.md or the README block is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import figures_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NOT_RECORDED = "not recorded"
ORDER = ("finetune", "local_teacher", "label_scoring", "capture", "curate", "router", "loop_demo", "cost", "teacher_prompt", "gpu")
# The commands the README gave for JSON that predates the envelope (they did not record one).
LEGACY_COMMANDS = {
    "curate": "python bench/bench_curate.py",
    "finetune": "python bench/bench_finetune.py --examples 96",
    "capture": "python bench/bench_capture.py",
    "router": "python bench/bench_router.py --n 200 --n-model 40 --out bench/router.json",
}
WHAT = {
    "finetune": "CPU training throughput: the recipe's settings vs plain TRL SFTTrainer defaults",
    "local_teacher": "local teacher: shared-prefix KV cache vs plain batched generation",
    "label_scoring": "label scoring over the label trie vs per-label buckets, the one-pass floor and generation",
    "capture": "capture against llama.cpp's OpenAI-compatible server; cached re-run",
    "curate": "curate stage on synthetic teacher records",
    "router": "router overhead over loopback HTTP (interleaved arms)",
    "loop_demo": "one turn of the loop (`make loop-demo`)",
    "cost": "$ per 1,000 requests from an evaluate report, with the prices it assumes",
    "teacher_prompt": "the demo teacher's gold accuracy by prompt",
    "gpu": "GPU tier: QLoRA at the mistral7b shape, planner vs measured peak",
}


# ---------------------------------------------------------------- reading


def load(results: Path) -> list[tuple[str, dict]]:
    docs = [(p.stem, json.loads(p.read_text())) for p in results.glob("*.json")]
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(docs, key=lambda d: (rank.get(d[0], len(ORDER)), d[0]))


def figures_of(name: str, data: dict) -> list[dict]:
    return data["figures"] if "figures" in data else figures_for(name, data)


def envelope_of(name: str, data: dict) -> dict:
    """The recorded envelope, or what an older JSON carried, with NOT_RECORDED for the rest."""
    if "envelope" in data:
        return data["envelope"]
    machine = data.get("machine")
    wall = data.get("wall_s")
    env: dict = {"command": None, "quick": False, "started_at": None,
                 "wall_s": wall if isinstance(wall, (int, float)) and name != "curate" else None,
                 "load_average": None, "machine": None, "versions": None, "git": None, "legacy": True}
    if isinstance(data.get("command"), str):
        env["command"] = data["command"]
    elif name in LEGACY_COMMANDS:
        env["command"] = LEGACY_COMMANDS[name]
        env["command_note"] = "as the README gave it; the JSON does not record its command"
    if isinstance(machine, str):
        env["machine"] = {"description": machine}
    elif isinstance(machine, dict):
        env["machine"] = {k: v for k, v in machine.items() if not k.startswith("loadavg")}
        if "loadavg_before" in machine:
            env["load_average"] = {"start": machine["loadavg_before"], "end": machine.get("loadavg_after")}
    if "cpu_count" in data:
        env["machine"] = {**(env["machine"] or {}), "cores": data["cpu_count"]}
    if "llama_cpp_python" in data:
        env["versions"] = {"llama-cpp-python": data["llama_cpp_python"]}
    return env


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
    if set(m) == {"description"}:
        return m["description"]
    parts = [str(m[k]) for k in ("arch", "cpu", "os") if m.get(k)]
    cores = m.get("cores", m.get("cpus"))
    parts.append(f"{cores} cores" if cores else f"cores {NOT_RECORDED}")
    if "affinity" in m:
        parts.append(f"affinity {m['affinity']}, {'pinned' if m.get('pinned') else 'not pinned'}")
    else:
        parts.append(f"pinning {NOT_RECORDED}")
    for key, label in (("ram_gib", "GiB RAM"), ("torch_threads", "torch threads"), ("threads", "torch threads"),
                       ("torch_threads_a", "torch threads (arm a)")):
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
        "reruns every bench and regenerates this file and the README's Performance block",
        "(`BENCH_QUICK=1 make bench`: tiny sizes, written to `bench/results-quick/` instead).",
        "",
        "The machines are shared and noisy: compare ratios (value / a baseline measured in the same",
        "run) rather than absolute figures, and read each bench's load average. Each bench ran on its",
        "own, at its own time; results written before the scripts recorded an envelope say",
        f"\"{NOT_RECORDED}\" for what they lack.",
        "",
    ]
    for name, data in docs:
        env = envelope_of(name, data)
        figures = figures_of(name, data)
        command = _command(env)
        lines += [f"## {name}: {WHAT.get(name, name)}", "",
                  f"`{rel}/{name}.json`{' — **quick run** (tiny sizes, not a measurement)' if env.get('quick') else ''}",
                  "",
                  f"- command: `{command}`" + (f" ({env['command_note']})" if env.get("command_note") else ""),
                  f"- run: started {env.get('started_at') or NOT_RECORDED}, "
                  f"wall {format_amount(env['wall_s'], 's') if env.get('wall_s') is not None else NOT_RECORDED}",
                  f"- machine: {_machine(env)}",
                  f"- load average: {_load(env)}",
                  f"- versions: {_versions(env)}",
                  f"- git: {_git(env)}",
                  "",
                  "| figure | value | baseline | ratio | better | note | command |",
                  "|---|---|---|---|---|---|---|"]
        for f in figures:
            lines.append(f"| {f['name']} | {format_value(f)} | {format_baseline(f)} | {format_ratio(f)} | "
                         f"{f['better']} | {f.get('note') or ''} | `{command}` |")
        lines.append("")
    return "\n".join(lines)


def render_readme_block(docs: list[tuple[str, dict]], results: Path) -> str:
    rel = _rel(results)
    lines = [START,
             f"<!-- generated by bench/report.py from {rel}/*.json (make bench); edit those, not this block -->",
             "",
             "| bench | figure | value | baseline (same run) | ratio | note |",
             "|---|---|---|---|---|---|"]
    runs = []
    for name, data in docs:
        env = envelope_of(name, data)
        for f in figures_of(name, data):
            if f.get("headline"):
                lines.append(f"| {name} | {f['name']} | {format_value(f)} | {format_baseline(f)} | "
                             f"{format_ratio(f)} | {f.get('note') or ''} |")
        started = env.get("started_at") or "date not recorded"
        runs.append(f"- `{rel}/{name}.json`: `{_command(env)}`; {started}; load average {_load(env)}")
    lines += ["", "Where each figure comes from (one run per bench; every figure and its envelope in "
                  "[`bench/RESULTS.md`](bench/RESULTS.md)):", "", *runs, END]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + block + tail


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS.md next to --results' folder "
                        "(bench/RESULTS.md for bench/results)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone (quick runs)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when anything is stale")
    args = parser.parse_args(argv)

    docs = load(args.results)
    if not docs:
        raise SystemExit(f"no *.json in {args.results}")
    out = args.out or (args.results.parent / "RESULTS.md" if args.results.name == "results"
                       else args.results / "RESULTS.md")
    targets = {out: render_results(docs, args.results) + "\n"}
    if not args.no_readme:
        targets[args.readme] = replace_block(args.readme.read_text(), render_readme_block(docs, args.results))
    stale = [p for p, text in targets.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"out of date: {p} (run python bench/report.py)")
        return 1 if stale else 0
    for p in stale:
        p.write_text(targets[p])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
