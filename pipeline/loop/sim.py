"""`distill loop-sim RECIPE [--rounds N] [--requests M]`: the loop, simulated on a labelled dataset.

    distill loop-sim banking77-cpu --rounds 3 --requests 500
    make loop-sim RECIPE=banking77-cpu ARGS="--rounds 3 --requests 500"   (also writes the bench JSON)

The recipe's teacher is a logs file (`teacher.spec=logs:<file>`): its labels stand in for a paid
teacher, a simulation that every output says it is (route `teacher`, source `logs`).

Round 0 is the recipe's run (`distill run`, its unchanged stages skipped) and its registered
export, the champion. Each round after it:

1. serves the champion (`models:/<name>@champion`, the app `distill serve --model` builds) on a
   loopback port and sends it M queries from the logs file that no curated split of round 0 holds
   and no earlier round sent (a fixed shuffle, curate.seed), one request each, through the `openai`
   SDK; escalations are answered by the logs teacher and logged to rounds/r<N>-escalations.jsonl;
2. retrains on that log (`distill retrain`: gather, the stages, candidate vs champion on the
   frozen test split);
3. promotes the candidate when the comparison's verdict is `promote` (the registry's promote).

Each round's figures (`round_row`): the candidate's frozen-test agreement with the teacher and
accuracy against the gold labels, with 95% bootstrap CIs; its local share at the quality target
and routed $ per 1,000 requests priced as `eval.cost.teacher_priced_as` (its evaluate report);
the share the champion answered locally while serving the round; escalations logged, examples
added, training time, the verdict and whether it was promoted. The result goes to
rounds/loop_sim.json; bench/loop_sim.py writes the same with the bench envelope.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.artifacts import EVAL_REPORT, atomic_write_json, iter_jsonl, read_jsonl, read_manifest
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.loop.compare import PREDICTIONS
from pipeline.loop.gather import prompt_key
from pipeline.loop.retrain import GATHER_SUMMARY, Rounds, first_champion, registered_name, retrain
from pipeline.registry import CHAMPION, Registry
from pipeline.stats import mean_figure

log = logging.getLogger(__name__)

RESULT = "loop_sim.json"
CURVES = "loop_sim.png"
SPLITS = ("train", "validation", "test")


def simulate(
    recipe: Recipe, runs_root: Path = Path("runs"), rounds: int = 3, requests: int = 500, concurrency: int = 4
) -> dict[str, Any]:
    """Round 0 (made when missing), then `rounds` rounds of serve -> retrain -> promote; the table."""
    from pipeline.runner import run_pipeline
    from pipeline.tracking import resolve_uri

    if not recipe.teacher.spec.startswith("logs:"):
        raise DistillError(
            f"loop-sim answers escalations from a labelled logs file; teacher.spec is {recipe.teacher.spec}, "
            "not logs:<file>"
        )
    start = time.perf_counter()
    round_zero = run_pipeline(recipe, runs_root=runs_root)
    round_zero_s = time.perf_counter() - start
    name, where = registered_name(recipe), Rounds(runs_root / recipe.name)
    registry = Registry(resolve_uri(recipe.tracking.uri))
    if registry.resolve(name, CHAMPION) is None:
        first_champion(registry, name, where.base)
    queries = unseen_queries(recipe, where.base)
    zero = round_row(recipe, 0, where.run_dir(0), served=None, escalations=0, gathered=None, compare=None)
    ran = {o.name: round(o.wall_s, 1) for o in round_zero.outcomes if not o.skipped}
    earlier = earlier_rows(where, where.next())
    before = earlier[0] if earlier and earlier[0]["round"] == 0 else None
    # Round 0's time is the run that made it: a continued simulation skips its stages.
    zero |= {"wall_s": round(round_zero_s, 1), "stages_s": ran} if ran or before is None else timing(before)
    rows = [zero, *(row for row in earlier if row["round"] > 0)]
    for _ in range(rounds):
        n = where.next()
        batch = queries[(n - 1) * requests : n * requests]
        if not batch:
            raise DistillError(f"round {n}: no unseen queries left in {recipe.teacher.spec} ({len(queries)} in all)")
        rows.append(run_round(recipe, runs_root, registry, name, where, n, batch, concurrency))
    result = {
        "recipe": recipe.name,
        "teacher": recipe.teacher.spec,
        "simulated": "escalations answered from the logs file's labels (route teacher, source logs)",
        "priced_as": recipe.eval.cost.teacher_priced_as,
        "escalations_priced_at": escalation_price(recipe),
        "requests_per_round": requests,
        "concurrency": concurrency,
        "unseen_queries": len(queries),
        "champion": registry.require(name, CHAMPION).version,
        "rounds": rows,
    }
    atomic_write_json(where.root / RESULT, result)
    plot_rounds(result, where.root / CURVES)
    return result


def run_round(
    recipe: Recipe,
    runs_root: Path,
    registry: Registry,
    name: str,
    where: Rounds,
    n: int,
    batch: list[str],
    concurrency: int,
) -> dict[str, Any]:
    log_path = where.root / f"r{n}-escalations.jsonl"
    log_path.unlink(missing_ok=True)  # a round interrupted while serving is served again from the start
    start = time.perf_counter()
    served = serve_queries(recipe, registry, name, log_path, batch, concurrency)
    serve_s = time.perf_counter() - start
    escalations = sum(1 for _ in iter_jsonl(log_path)) if log_path.is_file() else 0
    if escalations == 0:
        raise DistillError(f"round {n}: the champion escalated none of {len(batch)} queries; nothing to retrain on")
    start = time.perf_counter()
    result = retrain(recipe, runs_root, [log_path])
    retrain_s = time.perf_counter() - start
    promoted = settle(registry, name, result.report["verdict"], result.candidate.version)
    gathered = json.loads((result.run_dir / "gather" / GATHER_SUMMARY).read_text())
    row = round_row(recipe, n, result.run_dir, served, escalations, gathered, result.report)
    row |= {
        "candidate_version": result.candidate.version,
        "promoted": promoted,
        "champion_after": registry.require(name, CHAMPION).version,
        "serve_s": round(serve_s, 1),
        "retrain_s": round(retrain_s, 1),
    }
    log.info("loop-sim round %d: %s (%s)", n, result.report["verdict"], result.report["why"])
    return row


def escalation_price(recipe: Recipe) -> dict[str, Any] | str:
    """What the logs teacher charged each escalation (the router's serving log line says the same)."""
    from pipeline.teachers.logs import simulated_price

    price = simulated_price(recipe.teacher, recipe.eval.cost)
    return asdict(price) if price is not None else "unpriced: $0 (no eval.cost.teacher_priced_as or teacher.price)"


def earlier_rows(where: Rounds, first_new: int) -> list[dict[str, Any]]:
    """The rows an earlier `loop-sim` wrote for the rounds before `first_new`, so a simulation
    continued later (`--rounds 1` again) keeps the whole table."""
    path = where.root / RESULT
    if not path.is_file():
        return []
    return [row for row in json.loads(path.read_text())["rounds"] if row["round"] < first_new]


def timing(row: dict[str, Any]) -> dict[str, Any]:
    return {"wall_s": row["wall_s"], "stages_s": row["stages_s"]}


def settle(registry: Registry, name: str, verdict: str, candidate: str) -> bool:
    """The candidate becomes the champion when the comparison's verdict is `promote`, and only then;
    True when it did."""
    if verdict != "promote":
        return False
    registry.promote(name, candidate)
    return True


def unseen_queries(recipe: Recipe, base: Path) -> list[str]:
    """The logs file's user messages that no curated split of round 0 holds, in a fixed shuffle."""
    from pipeline.teachers.logs import import_logs

    ref = recipe.teacher.spec.partition(":")[2]
    imported = import_logs(ref, recipe.teacher.prompt_col, recipe.teacher.label_col, recipe.capture.prompts_split)
    curated = {prompt_key(r) for split in SPLITS for r in read_jsonl(base / "curate" / f"{split}.jsonl")}
    seen: set[str] = set()
    queries = []
    for record in imported.records:
        # One user turn: what a query is; a logged conversation with more turns is not replayed.
        if len(record.messages) != 1:
            continue
        key = prompt_key({"messages": [*record.messages, {"role": "assistant", "content": record.answer}]})
        if key in curated or key in seen:
            continue
        seen.add(key)
        queries.append(record.messages[0]["content"])
    random.Random(recipe.curate.seed).shuffle(queries)
    return queries


def serve_queries(
    recipe: Recipe, registry: Registry, name: str, log_path: Path, queries: list[str], concurrency: int
) -> dict[str, Any]:
    """The champion behind the router (`distill serve --model models:/<name>@champion`'s app), each
    query sent once with the `openai` SDK over loopback HTTP; what the router did with each."""
    import openai

    from pipeline.router.http_server import serving_in_background
    from pipeline.router.settings import settings_for
    from pipeline.router.wiring import alias_app

    cfg = recipe.serve.model_copy(update={"escalations": log_path})
    app = alias_app(registry, name, CHAMPION, cfg, recipe)
    with serving_in_background(app, settings_for(cfg)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=cfg.deadline_s * 3)

        def ask(query: str) -> tuple[str, str | None]:
            raw = client.chat.completions.with_raw_response.create(
                model=cfg.model_name,
                max_tokens=recipe.eval.max_new_tokens,
                messages=[{"role": "user", "content": query}],
            )
            return raw.headers.get("x-distill-route", "unknown"), raw.headers.get("x-distill-source")

        with ThreadPoolExecutor(concurrency) as pool:
            answered = list(pool.map(ask, queries))
    routes = Counter(route for route, _ in answered)
    local = [route == "student" for route, _ in answered]
    return {
        "sent": len(queries),
        "routes": dict(sorted(routes.items())),
        "teacher_sources": dict(sorted(Counter(s for r, s in answered if r == "teacher").items())),
        "local_share": mean_figure(local, recipe.eval.bootstrap, recipe.eval.seed).to_json(),
    }


def round_row(
    recipe: Recipe,
    n: int,
    run_dir: Path,
    served: dict[str, Any] | None,
    escalations: int,
    gathered: dict[str, Any] | None,
    compare: dict[str, Any] | None,
) -> dict[str, Any]:
    """One round's figures from its evaluate (on the frozen test split), gather and comparison."""
    reps, seed = recipe.eval.bootstrap, recipe.eval.seed
    evaluate = run_dir / "evaluate"
    rows = [row for _, row in iter_jsonl(evaluate / PREDICTIONS)]
    graded = [bool(r["tuned_correct"]) for r in rows if r.get("tuned_correct") is not None]
    report = json.loads((evaluate / EVAL_REPORT).read_text())
    priced = (report.get("cost") or {}).get("priced_as")
    finetune = read_manifest(run_dir / "finetune")
    train_s = finetune.metrics.get("train_wall_s") if finetune is not None else None
    return {
        "round": n,
        "train_examples": sum(1 for _ in iter_jsonl(run_dir / "curate" / "train.jsonl")),
        "served": served,
        "escalations_logged": escalations,
        "examples_added": gathered["added"] if gathered else 0,
        "escalated_slice": gathered["escalated_slice"] if gathered else 0,
        "skipped": gathered["skipped"] if gathered else {},
        "test_agreement": mean_figure([bool(r["tuned_agrees"]) for r in rows], reps, seed).to_json(),
        "test_accuracy": mean_figure(graded, reps, seed).to_json() if graded else None,
        "local_share": report["router"]["test"]["local_share"],
        "routed_usd_per_1k_priced": None
        if not priced
        else {
            "spec": priced["spec"],
            "value": priced["routed_usd_per_1k"],
            "lo": priced["routed_usd_per_1k_lo"],
            "hi": priced["routed_usd_per_1k_hi"],
            "teacher_only": priced["teacher_usd_per_1k"],
        },
        "train_s": train_s,
        "verdict": compare["verdict"] if compare else "round 0",
        "why": compare["why"] if compare else "the recipe's run: the first champion",
        "significantly_worse": compare["significantly_worse"] if compare else False,
    }


def plot_rounds(result: dict[str, Any], path: Path) -> None:
    """The round curves: frozen-test agreement, accuracy and local share with their 95% CIs, and the
    routed $ per 1,000 requests priced as the named API (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation.plots import save_png

    rows = result["rounds"]
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for key, label in (
        ("test_agreement", "agrees with teacher"),
        ("test_accuracy", "accuracy vs gold"),
        ("local_share", "local share at the target"),
    ):
        points = [(r["round"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.errorbar(
                [n for n, _ in points],
                [f["value"] for _, f in points],
                yerr=[[f["value"] - f["lo"] for _, f in points], [f["hi"] - f["value"] for _, f in points]],
                marker="o",
                capsize=3,
                label=label,
            )
    ax.set(xlabel="round", ylabel="frozen test split", ylim=(0, 1), xticks=x)
    handles, labels = ax.get_legend_handles_labels()
    costs = [(r["round"], r["routed_usd_per_1k_priced"]) for r in rows if r["routed_usd_per_1k_priced"]]
    if costs:
        right = ax.twinx()
        spec = costs[0][1]["spec"]
        (line,) = right.plot([n for n, _ in costs], [c["value"] for _, c in costs], "k--", marker="s")
        right.set_ylabel(f"$ / 1k requests ({spec})")
        right.set_ylim(bottom=0)
        handles, labels = [*handles, line], [*labels, f"routed $/1k, priced as {spec}"]
    ax.legend(handles, labels, loc="lower left", fontsize=8)
    ax.set_title(f"{result['recipe']}: the loop, simulated (teacher {result['teacher']})", fontsize=9)
    save_png(plt, fig, path)
