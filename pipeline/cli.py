"""`distill` command line: parses arguments and calls the runner or a stage. No logic here.

distill run [RECIPE] [key=value ...]      every stage (what `make distill` runs)
distill finetune mistral7b train.epochs=2  stages up to finetune, unchanged ones skipped
distill validate RECIPE                    check a recipe without running anything
distill init NAME --from chat.jsonl        a task file and a recipe inferred from logs
distill sweep RECIPE train.lr=3e-4,1e-3    recipe search: one trial per combination, best on validation
distill plan mistral7b                     estimated peak GPU memory on A10G / A100 (no GPU needed)
distill retrain RECIPE                     the loop's next round from the router's escalations
distill promote RECIPE [VERSION]           / distill rollback RECIPE: move the registry's champion alias
distill loop-sim RECIPE --rounds 3         the loop simulated on a labelled logs file (serve, retrain, promote)
distill batches RECIPE [--cancel ID]       provider batches of teacher.mode=batch captures
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import typer

from pipeline.errors import DistillError

DEFAULT_RECIPE = "smollm2-135m-cpu"
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a teacher's task into a small student.",
)

RecipeArg = typer.Argument(DEFAULT_RECIPE, help="Recipe name in recipes/ or a path to a YAML file.")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. train.epochs=2 lora.r=32.")
RunsOpt = typer.Option(Path("runs"), "--runs-dir", help="Where run folders go.")
ForceOpt = typer.Option(False, "--force", help="Rerun stages even when unchanged.")


def _pipeline(until: str | None, recipe: str, overrides: list[str] | None, runs_dir: Path, force: bool) -> None:
    from pipeline.config import load_recipe
    from pipeline.report import print_summary
    from pipeline.runner import run_pipeline

    cfg = load_recipe(recipe, overrides)
    result = run_pipeline(cfg, until=until, runs_root=runs_dir, force=force)
    print_summary(cfg, result)


@app.command()
def run(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    runs_dir: Path = RunsOpt,
    force: bool = ForceOpt,
):
    """Run every stage: capture, curate, finetune, evaluate, export."""
    _pipeline(None, recipe, overrides, runs_dir, force)


def _stage_command(stage: str, doc: str):
    def command(
        recipe: str = RecipeArg,
        overrides: list[str] | None = OverridesArg,
        runs_dir: Path = RunsOpt,
        force: bool = ForceOpt,
    ):
        _pipeline(stage, recipe, overrides, runs_dir, force)

    command.__doc__ = (
        f"{doc}\n\nOften overridden: {', '.join(STAGE_OVERRIDES[stage])} (all fields: recipes/REFERENCE.md)."
    )
    app.command(name=stage)(command)


# The dotted overrides users reach for first, per command; the full list is generated in recipes/REFERENCE.md.
STAGE_OVERRIDES = {
    "capture": [
        "teacher.spec=openai:gpt-4o-mini",
        "teacher.base_url=URL",
        "teacher.budget_usd=5",
        "teacher.concurrency=8",
        "teacher.rpm=500",
        "teacher.price.input_per_mtok=0.15",
        "teacher.price.output_per_mtok=0.6",
        "teacher.max_new_tokens=12",
        "capture.limit=1000",
        "teacher.mode=batch",
    ],
    "curate": ["curate.target_size=2000", "curate.pii=true", "curate.near_dup_threshold=0.7", "eval.file=PATH"],
    "finetune": ["train.epochs=2", "train.lr=2e-4", "train.lora.r=32", "train.max_seq_len=512", "train.batch_size=8"],
    "evaluate": [
        "router.quality_target=0.9",
        "router.signal=label_prob",
        "eval.base_prompt=few_shot",
        "eval.file=PATH",
    ],
    "export": ["export.formats=[merged,adapter,gguf]", "export.gguf_types=[f16,q8_0,q4_k_m]"],
}


@app.command(name="capture")
def capture(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    runs_dir: Path = RunsOpt,
    force: bool = ForceOpt,
    no_wait: bool = typer.Option(
        False,
        "--no-wait",
        help="teacher.mode=batch: submit the batches and exit; "
        "the next capture collects them (teacher.batch_wait=false).",
    ),
):
    from pipeline.teachers.batch import BatchesPending

    try:
        _pipeline(
            "capture", recipe, [*(overrides or []), *(["teacher.batch_wait=false"] if no_wait else [])], runs_dir, force
        )
    except BatchesPending as pending:
        typer.echo(f"submitted: {pending}")


capture.__doc__ = (
    "Label the prompts with the teacher (cached, so reruns cost nothing).\n\n"
    f"Often overridden: {', '.join(STAGE_OVERRIDES['capture'])} (all fields: recipes/REFERENCE.md)."
)


@app.command()
def batches(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    cancel: str | None = typer.Option(
        None,
        "--cancel",
        help="Cancel this provider batch id; the next capture keeps what it finished and resubmits the rest.",
    ),
):
    """List the provider batches of the recipe's teacher cache (teacher.mode=batch): status, requests, cost."""
    import asyncio

    from pipeline.config import load_recipe
    from pipeline.teachers.batch import cancel as cancel_batch
    from pipeline.teachers.batch import format_batches, list_batches, refresh
    from pipeline.teachers.service import TeacherService

    cfg = load_recipe(recipe, overrides)
    service = TeacherService.from_config(cfg.teacher, cfg.capture.cache)
    try:
        if cancel is not None:
            typer.echo(f"batch {cancel}: {asyncio.run(cancel_batch(service, cfg.teacher, cancel))}")
        rows = list_batches(service.cache)
        if cfg.teacher.spec.startswith(("openai:", "anthropic:")):
            asyncio.run(refresh(service, cfg.teacher, rows))
            rows = list_batches(service.cache)
        typer.echo(format_batches(rows, cfg.capture.cache))
    finally:
        service.close()


for _name, _doc in [
    ("curate", "Clean, dedupe and split the teacher's answers (runs capture first if needed)."),
    ("finetune", "LoRA/QLoRA the student (runs earlier stages first if needed)."),
    ("evaluate", "Compare base and tuned student with the teacher; choose the router threshold."),
    ("export", "Write each export.formats artifact (merged, adapter, GGUF), re-check it, register it."),
]:
    _stage_command(_name, _doc)


@app.command()
def sweep(
    recipe: str = RecipeArg,
    axes: list[str] | None = typer.Argument(
        None,
        help="Axes key=v1,v2 (dotted overrides with comma-separated values; a key=value is applied to every trial).",
    ),
    runs_dir: Path = RunsOpt,
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="K/N: run only trials K, K+N, ... (one process per "
        "GPU, each with its CUDA_VISIBLE_DEVICES; all share the parent run).",
    ),
    prepare: bool = typer.Option(
        False,
        "--prepare",
        help="Create the parent run and the shared capture/curate, train nothing (before launching --shard processes).",
    ),
    name: str | None = typer.Option(None, "--name", help="Sweep folder name; default a hash of the recipe and axes."),
):
    """Recipe search: train and evaluate every combination of the axes, each trial a child MLflow run
    under one parent; the best is chosen on validation agreement (never test). Reruns skip finished trials."""
    from pipeline.sweep.plan import parse_shard, plan_sweep
    from pipeline.sweep.run import run_sweep
    from pipeline.sweep.table import print_table

    plan = plan_sweep(recipe, list(axes or []), runs_dir, name)
    outcome = run_sweep(plan, parse_shard(shard), prepare)
    if prepare:
        typer.echo(f"sweep {plan.folder}: parent run {outcome.parent_run_id}, {len(plan.trials)} trials")
        return
    print_table(outcome)


@app.command()
def retrain(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    runs_dir: Path = RunsOpt,
    escalations: list[Path] | None = typer.Option(
        None,
        "--escalations",
        help="Escalation logs to gather (repeatable); default retrain.escalations, else serve.escalations.",
    ),
):
    """The next round of the loop: gather the router's escalations, curate, finetune and evaluate a
    candidate on the frozen test split, compare it with the champion, register it as `candidate`."""
    from pipeline.config import load_recipe
    from pipeline.loop.retrain import Rounds, round_table
    from pipeline.loop.retrain import retrain as run_round
    from pipeline.report import print_rounds

    cfg = load_recipe(recipe, overrides)
    result = run_round(cfg, runs_dir, escalations)
    typer.echo(f"round {result.round}: {result.report['verdict'].upper()} ({result.report['why']})")
    typer.echo(
        f"report: {result.run_dir / 'compare' / 'report.md'}; candidate is version {result.candidate.version}"
        f" (`distill promote {recipe}` makes it the champion)"
    )
    print_rounds(round_table(Rounds(runs_dir / cfg.name)))


@app.command()
def promote(
    recipe: str = RecipeArg,
    version: str | None = typer.Argument(None, help="Registered version; default: the `candidate` alias."),
    force: bool = typer.Option(False, "--force", help="Promote even a candidate worse than the champion."),
):
    """Point the `champion` alias at VERSION (the old champion becomes `previous`); a router serving
    models:/<name>@champion follows within serve.registry_poll_s."""
    from pipeline.config import load_recipe
    from pipeline.loop.retrain import registered_name
    from pipeline.registry import Registry
    from pipeline.tracking import resolve_uri

    cfg = load_recipe(recipe)
    served = Registry(resolve_uri(cfg.tracking.uri)).promote(registered_name(cfg), version, force)
    typer.echo(f"{registered_name(cfg)}: champion is version {served.version} (round {served.round}, {served.source})")


@app.command()
def rollback(recipe: str = RecipeArg):
    """Point the `champion` alias back at the version it replaced."""
    from pipeline.config import load_recipe
    from pipeline.loop.retrain import registered_name
    from pipeline.registry import Registry
    from pipeline.tracking import resolve_uri

    cfg = load_recipe(recipe)
    served = Registry(resolve_uri(cfg.tracking.uri)).rollback(registered_name(cfg))
    typer.echo(f"{registered_name(cfg)}: champion is back to version {served.version} (round {served.round})")


@app.command("loop-sim")
def loop_sim(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    runs_dir: Path = RunsOpt,
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds after round 0."),
    requests: int = typer.Option(500, "--requests", min=1, help="Unseen queries served per round."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight at once."),
):
    """The loop simulated on a labelled logs file (teacher.spec=logs:<file>): each round serves unseen
    queries through the router, the file answering escalations, retrains on them, promotes on the
    verdict. Writes runs/<recipe>/rounds/loop_sim.json and loop_sim.png (the curves)."""
    from pipeline.config import load_recipe
    from pipeline.loop.sim import RESULT, simulate
    from pipeline.report import print_sim_rounds

    cfg = load_recipe(recipe, overrides)
    result = simulate(cfg, runs_dir, rounds, requests, concurrency)
    print_sim_rounds(result)
    typer.echo(f"wrote {runs_dir / cfg.name / 'rounds' / RESULT}; champion is version {result['champion']}")


@app.command()
def init(
    name: str = typer.Argument(..., help="Name of the recipe (and of its task file) to write."),
    source: str = typer.Option(
        ...,
        "--from",
        help="The logs to learn from: chat JSONL, ShareGPT, an OpenAI Batch "
        "input+output pair (a.jsonl+b.jsonl), CSV/JSONL columns, or a datasets folder.",
    ),
    prompt_col: str | None = typer.Option(None, help="Column holding the prompt (tables); default: guessed."),
    label_col: str | None = typer.Option(None, help="Column holding the answer (tables); default: guessed."),
    base: str = typer.Option(
        "embedded:smollm2-135m-instruct", help="Student base model (its tokenizer counts the lengths)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing recipe or task file of that name."),
):
    """Write a task file and a recipe from logs: kind, labels or JSON Schema, student input, lengths, size."""
    from pipeline.scaffold import init as scaffold

    task_path, recipe_path = scaffold(name, source, prompt_col=prompt_col, label_col=label_col, base=base, force=force)
    typer.echo(f"wrote {task_path} and {recipe_path} (each inferred choice is commented there)")
    typer.echo(f"next: make distill RECIPE={name}    (or: distill run {name})")


@app.command()
def validate(recipe: str = RecipeArg, overrides: list[str] | None = OverridesArg):
    """Check a recipe (and overrides) without running anything."""
    from pipeline.config import check_input_files, load_recipe

    cfg = load_recipe(recipe, overrides)
    check_input_files(cfg, recipe)
    typer.echo(f"{recipe}: ok ({cfg.model.base}, train.method={cfg.train.method})")


@app.command()
def plan(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    model_dir: Path | None = typer.Option(
        None, help="Read config.json from this folder instead of the built-in table."
    ),
):
    """Estimate the recipe's peak GPU memory on A10G 24 GB, A100 40 GB and 80 GB (no GPU needed)."""
    from pipeline.config import load_recipe
    from pipeline.planner import load_architecture, plan_table

    cfg = load_recipe(recipe, overrides)
    arch = load_architecture(
        str(model_dir) if model_dir else cfg.model.base, None if model_dir else cfg.model.architecture
    )
    typer.echo(plan_table(arch, cfg.train, cfg.name))


@app.command()
def recipes():
    """List the recipes in recipes/."""
    from pipeline.config import available_recipes

    for name in available_recipes():
        typer.echo(name)


@app.command()
def schema(out: Path = typer.Option(Path("recipes"), help="Folder for schema.json and REFERENCE.md.")):
    """Write the recipe JSON Schema and the field reference, both generated from the pydantic models."""
    from pipeline.artifacts import atomic_write_text
    from pipeline.config import recipe_reference, recipe_schema

    atomic_write_text(out / "schema.json", json.dumps(recipe_schema(), indent=2) + "\n")
    atomic_write_text(
        out / "REFERENCE.md",
        "# Recipe reference\n\nGenerated by `make schema` from pipeline/config.py.\n\n" + recipe_reference(),
    )
    typer.echo(f"wrote {out / 'schema.json'} and {out / 'REFERENCE.md'}")


@app.command()
def serve(
    recipe: str = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    runs_dir: Path = RunsOpt,
    model_dir: Path | None = typer.Option(None, help="Serve this model folder instead of the recipe's export."),
    policy_file: Path | None = typer.Option(None, "--policy", help="Router policy JSON (default: the run's evaluate)."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Serve a registry alias, models:/<name>@<alias>, with "
        "its run's policy, and follow it when `distill promote`/`rollback` move it.",
    ),
    teacher_only: bool = typer.Option(
        False,
        "--teacher-only",
        help="No student: a capture proxy forwarding each "
        "request as sent to the recipe's teacher and recording every pair to "
        "serve.proxy_log (point the app's OPENAI_BASE_URL here).",
    ),
):
    """Serve the student behind an OpenAI-compatible API that escalates low-confidence requests to the
    recipe's teacher (serve.mode, serve.host:serve.port, 127.0.0.1 by default); with --teacher-only, a
    capture proxy in front of the teacher, before any student exists."""
    from pipeline.artifacts import EVAL_POLICY, EXPORT_MERGED, completed_stage
    from pipeline.config import load_recipe
    from pipeline.llm.policy import Policy
    from pipeline.router.wiring import check_policy_matches_export, exported_student_input
    from pipeline.router.wiring import serve as serve_app

    cfg = load_recipe(recipe, overrides)
    if teacher_only:
        from pipeline.router.wiring import serve_proxy

        if model is not None or model_dir is not None or policy_file is not None:
            raise DistillError("--teacher-only serves no student; drop --model, --model-dir and --policy")
        serve_proxy(cfg)
        return
    if model is not None:
        _serve_alias(cfg, model, model_dir, policy_file)
        return
    run_dir = runs_dir / cfg.name
    policy_path = policy_file
    if policy_path is None and not (model_dir is not None and not (run_dir / "evaluate" / EVAL_POLICY).is_file()):
        policy_path = completed_stage(run_dir, "evaluate", EVAL_POLICY)
    model_dir = model_dir or completed_stage(run_dir, "export", EXPORT_MERGED)
    if policy_path is None:
        logging.getLogger(__name__).warning(
            "no evaluated policy for %s: serving student-only, nothing escalates", model_dir
        )
        policy = Policy.student_only(cfg.router.signal, exported_student_input(Path(model_dir).parent))
    else:
        policy = Policy.load(policy_path)
    if policy_path is not None:
        # Before the slow model load: a policy evaluated on another adapter is refused at once.
        check_policy_matches_export(policy_path, Path(model_dir).parent)
    serve_app(model_dir, policy, cfg.serve, recipe=cfg, policy_path=policy_path)


def _serve_alias(cfg, model: str, model_dir: Path | None, policy_file: Path | None) -> None:
    from pipeline.registry import Registry, parse_model_uri
    from pipeline.router.wiring import serve_alias
    from pipeline.tracking import resolve_uri

    if model_dir is not None or policy_file is not None:
        given = "--model-dir" if model_dir is not None else "--policy"
        raise DistillError(
            f"--model serves a registry version with its own run's policy; drop {given}, "
            "or drop --model to serve a folder"
        )
    name, alias = parse_model_uri(model)  # before opening the registry: a typo fails at once
    serve_alias(Registry(resolve_uri(cfg.tracking.uri)), name, alias, cfg.serve, recipe=cfg)


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in (
        "alembic",
        "mlflow",
        "httpx",
        "urllib3",
        "datasets",
        "transformers",
        "peft",
        "bitsandbytes",
        "httpx2",
        "openai",
        "anthropic",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR if noisy == "bitsandbytes" else logging.WARNING)


def _interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM (process managers, `docker stop`) takes the Ctrl-C path: stages already stop
    cleanly on KeyboardInterrupt (answers cached, checkpoints kept). Returns the undo; only the
    main thread may set handlers, so elsewhere (a test runner's worker thread) it is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        # As a SIGINT, not a bare raise: inside asyncio.run (capture) the runner's own SIGINT
        # handler then cancels the main task cleanly, instead of a KeyboardInterrupt landing in
        # whichever task is running and being logged as never retrieved. A process started
        # with SIGINT ignored (`cmd &` in a script) gets the bare KeyboardInterrupt.
        if not callable(signal.getsignal(signal.SIGINT)):
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (testable without a subprocess)."""
    configure_logging()
    restore = _interrupt_on_sigterm()
    try:
        return _main(argv)
    finally:
        restore()


def _main(argv: list[str] | None) -> int:
    try:
        # Non-standalone typer returns the exit code; Ctrl-C comes back as 130.
        code = app(args=argv, prog_name="distill", standalone_mode=False)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except typer.Exit as exit_:
        return exit_.exit_code
    except typer.TyperException as err:  # usage errors: bad option, missing argument
        # Typing quirk, ignored: typer exports only this base; each one it raises is its click's ClickException, with show().
        err.show()  # type: ignore[attr-defined]
        return err.exit_code
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    if code == 130:
        print("interrupted: rerun the same command to resume (finished stages are skipped)", file=sys.stderr)
    return code if isinstance(code, int) else 0
