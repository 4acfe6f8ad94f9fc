"""`make loop-demo`: one turn of the loop on this machine, measured.

    .venv/bin/python bench/loop_demo.py [RECIPE] [key=value ...] [--requests 100] [--concurrency 4]

1. Round 0 (`distill run`; skipped when done) and, when there is none, its export as the champion.
2. `distill serve RECIPE --model models:/<name>@champion` in a subprocess; prompts the rounds
   have never seen (data rows after capture.limit, a new slice per round) are sent to it over
   HTTP with the `openai` SDK; its escalations go to runs/<recipe>/rounds/r<N>-escalations.jsonl.
3. `distill retrain` on that log; the candidate is promoted when the comparison says so.
4. The round-over-round table is printed and written to bench/results/loop_demo.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.artifacts import atomic_write_json, read_jsonl
from pipeline.errors import DistillError

OUT = Path("bench/results/loop_demo.json")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from pipeline.cli import DEFAULT_RECIPE, configure_logging
    from pipeline.config import load_recipe
    from pipeline.loop.retrain import Rounds, first_champion, registered_name, retrain, round_table
    from pipeline.registry import CHAMPION, Registry
    from pipeline.report import print_rounds
    from pipeline.runner import run_pipeline
    from pipeline.tracking import resolve_uri

    configure_logging()
    recipe_name = args.recipe or DEFAULT_RECIPE
    recipe = load_recipe(recipe_name, args.overrides)
    runs = Path("runs")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    round_zero = run_pipeline(recipe, runs_root=runs)
    timings["round0_s"] = time.perf_counter() - start
    timings["round0_stages_s"] = {o.name: round(o.wall_s, 1) for o in round_zero.outcomes}

    name, rounds = registered_name(recipe), Rounds(runs / recipe.name)
    registry = Registry(resolve_uri(recipe.tracking.uri))
    if registry.resolve(name, CHAMPION) is None:
        first_champion(registry, name, rounds.base)
    n = rounds.next()
    log_path = rounds.root / f"r{n}-escalations.jsonl"
    prompts = unseen_prompts(recipe, n, args.requests)

    start = time.perf_counter()
    served = serve_and_replay(recipe_name, args.overrides, name, log_path, prompts, args.concurrency)
    timings["serve_and_replay_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = retrain(recipe, runs, [log_path])
    timings["retrain_s"] = time.perf_counter() - start
    promoted = None
    if result.report["verdict"] == "promote":
        promoted = registry.promote(name, result.candidate.version).version
    table = round_table(rounds)
    print_rounds(table)
    print(
        f"round {n}: {result.report['verdict']} ({result.report['why']})"
        + (f"; version {promoted} is the champion now" if promoted else "; the champion stays")
    )
    atomic_write_json(
        OUT,
        {
            "recipe": recipe.name,
            "round": n,
            "requests": served,
            "timings_s": timings,
            "verdict": result.report["verdict"],
            "why": result.report["why"],
            "promoted_version": promoted,
            "rounds": table,
            "command": " ".join(
                [
                    "python -m pipeline.loop.demo",
                    recipe_name,
                    *args.overrides,
                    f"--requests {args.requests} --concurrency {args.concurrency}",
                ]
            ),
        },
    )
    print(f"wrote {OUT}")
    return 0


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.loop.demo", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("overrides", nargs="*", help="Dotted recipe overrides, as for every distill command.")
    parser.add_argument("--requests", type=int, default=100, help="Unseen prompts sent to the router.")
    parser.add_argument("--concurrency", type=int, default=4, help="Requests in flight at once.")
    return parser.parse_args(argv)


def unseen_prompts(recipe, round_no: int, count: int) -> list[str]:
    """Prompts after capture.limit that no earlier demo round sent: round N takes the N-th slice."""
    if recipe.capture.limit is None:
        raise DistillError("the loop demo replays the prompts after capture.limit; this recipe captures them all")
    rows = read_jsonl(recipe.capture.prompts)
    start = recipe.capture.limit + (round_no - 1) * count
    picked = [r[recipe.capture.prompt_field] for r in rows[start : start + count]]
    if not picked:
        raise DistillError(f"{recipe.capture.prompts}: no unseen prompts left for round {round_no}")
    return picked


def serve_and_replay(
    recipe_name: str, overrides: list[str], model_name: str, log_path: Path, prompts: list[str], concurrency: int
) -> dict:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "serve",
        recipe_name,
        *overrides,
        "--model",
        f"models:/{model_name}@champion",
        f"serve.port={port}",
        f"serve.escalations={log_path}",
    ]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server)
        return replay(url, prompts, concurrency)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def replay(url: str, prompts: list[str], concurrency: int) -> dict:
    """Send every prompt once through the real `openai` SDK; count what the router did."""
    import openai

    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key=os.environ.get("DISTILL_DEMO_KEY", "unused"), max_retries=2, timeout=300
    )

    def ask(prompt: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="distill-student", max_tokens=16, messages=[{"role": "user", "content": prompt}]
        )
        return raw.headers.get("x-distill-route", "unknown")

    with ThreadPoolExecutor(concurrency) as pool:
        routes = list(pool.map(_safe(ask), prompts))
    counts: dict[str, int] = {}
    for route in routes:
        counts[route] = counts.get(route, 0) + 1
    return {"sent": len(prompts), "routes": counts}


def _safe(fn):
    def call(prompt: str) -> str:
        try:
            return fn(prompt)
        except Exception as err:  # counted, not fatal: the table says how many failed
            return f"failed: {type(err).__name__}"

    return call


def _wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DistillError(f"the router exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise DistillError(f"the router at {url} was not ready within {timeout_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
