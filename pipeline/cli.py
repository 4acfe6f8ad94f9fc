"""`distill` command line: parses arguments and calls the runner or a stage. No logic here.

    distill run [RECIPE] [key=value ...]      every stage (what `make distill` runs)
    distill finetune mistral7b train.epochs=2  stages up to finetune, unchanged ones skipped
    distill validate RECIPE                    check a recipe without running anything
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import DistillError

DEFAULT_RECIPE = "smollm2-135m-cpu"
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Distil a teacher's task into a small student.")

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
def run(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, runs_dir: Path = RunsOpt, force: bool = ForceOpt):
    """Run every stage: capture, curate, finetune, evaluate, export."""
    _pipeline(None, recipe, overrides, runs_dir, force)


def _stage_command(stage: str, doc: str):
    def command(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg, runs_dir: Path = RunsOpt, force: bool = ForceOpt):
        _pipeline(stage, recipe, overrides, runs_dir, force)

    command.__doc__ = doc
    app.command(name=stage)(command)


for _name, _doc in [
    ("capture", "Label the prompts with the teacher (cached, so reruns cost nothing)."),
    ("curate", "Clean, dedupe and split the teacher's answers (runs capture first if needed)."),
    ("finetune", "LoRA/QLoRA the student (runs earlier stages first if needed)."),
    ("evaluate", "Compare base and tuned student with the teacher; choose the router threshold."),
    ("export", "Merge the adapter into the base and verify the merged model."),
]:
    _stage_command(_name, _doc)


@app.command()
def validate(recipe: str = RecipeArg, overrides: Optional[list[str]] = OverridesArg):
    """Check a recipe (and overrides) without running anything."""
    from pipeline.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    typer.echo(f"{recipe}: ok ({cfg.model.base}, train.method={cfg.train.method})")


@app.command()
def recipes():
    """List the recipes in recipes/."""
    from pipeline.config import available_recipes

    for name in available_recipes():
        typer.echo(name)


@app.command()
def schema(out: Path = typer.Option(Path("recipes/schema.json"), help="Where to write the JSON Schema.")):
    """Write the recipe JSON Schema (generated from the pydantic models)."""
    import json

    from pipeline.artifacts import atomic_write_text
    from pipeline.config import recipe_schema

    atomic_write_text(out, json.dumps(recipe_schema(), indent=2) + "\n")
    typer.echo(f"wrote {out}")


@app.command()
def serve(
    recipe: str = RecipeArg,
    overrides: Optional[list[str]] = OverridesArg,
    runs_dir: Path = RunsOpt,
    model_dir: Optional[Path] = typer.Option(None, help="Serve this model folder instead of the recipe's export."),
    api_key_env: Optional[str] = typer.Option(None, help="Env var holding the bearer key clients must send."),
):
    """Serve the exported student behind an OpenAI-compatible API on 127.0.0.1."""
    from pipeline.config import load_recipe
    from pipeline.router.app import serve as serve_app

    cfg = load_recipe(recipe, overrides)
    folder = model_dir or runs_dir / cfg.name / "export" / "merged"
    serve_app(folder, host=cfg.router.host, port=cfg.router.port, api_key_env=api_key_env)


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("alembic", "mlflow", "httpx", "urllib3", "datasets", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (testable without a subprocess)."""
    import click

    _configure_logging()
    try:
        app(args=argv, prog_name="distill", standalone_mode=False)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted: rerun the same command to resume (finished stages are skipped)", file=sys.stderr)
        return 130
    return 0
