"""`make loop-sim`: the loop simulated on a labelled logs file, measured, with the bench envelope.

    .venv/bin/python bench/loop_sim.py [RECIPE] [key=value ...] [--rounds 3] [--requests 500] [--concurrency 4]

The simulation itself is `distill loop-sim` (pipeline/loop/sim.py: round 0, then per round serve
unseen queries through the router with the logs teacher answering escalations, retrain, promote on
the verdict); this script runs it and writes its rounds to bench/results/loop_sim.json with the
envelope (machine, versions, command), where bench/report.py renders them, and their curves to
bench/results/loop_sim.png. --quick only sends the
JSON to bench/results-quick/: the sizes are --rounds and --requests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from pipeline.cli import DEFAULT_RECIPE, configure_logging
    from pipeline.config import load_recipe
    from pipeline.loop.sim import plot_rounds, simulate
    from pipeline.report import print_sim_rounds

    configure_logging()
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE, args.overrides)
    result = simulate(recipe, args.runs_dir, args.rounds, args.requests, args.concurrency)
    print_sim_rounds(result)
    path = harness.write("loop_sim", result, args)
    plot_rounds(result, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return 0


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/loop_sim.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("recipe", nargs="?")
    parser.add_argument("overrides", nargs="*", help="Dotted recipe overrides, as for every distill command.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds after round 0.")
    parser.add_argument("--requests", type=int, default=500, help="Unseen queries served per round.")
    parser.add_argument("--concurrency", type=int, default=4, help="Requests in flight at once.")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="Where run folders go.")
    harness.add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    harness.exit_with(main)
