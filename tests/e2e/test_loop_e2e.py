"""The whole loop at tiny size: round 0, the router serving it (real HTTP, real `openai` SDK,
the embedded teacher answering escalations, half of them multi-turn conversations with their own
system prompt), `distill retrain`, the registry's aliases."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import yaml
from support.e2e_recipe import ROOT, write_recipe
from support.router_helpers import running

from pipeline.artifacts import read_jsonl, read_manifest
from pipeline.cli import main

SERVED_PROMPTS = 12  # unseen prompts the router answers: rows after capture.limit


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("loop")
    recipe_path = write_recipe(folder, tiny_llama_dir)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["serve"] = {"escalations": str(folder / "escalations.jsonl")}
    recipe["retrain"] = {"holdout": 0.25}
    recipe_path.write_text(yaml.safe_dump(recipe))
    runs = folder / "runs"
    assert main(["run", str(recipe_path), "--runs-dir", str(runs)]) == 0
    serve_round_zero(recipe_path, runs / "e2e", unseen_prompts(recipe["capture"]["limit"]))
    test_prompt = read_jsonl(runs / "e2e" / "curate" / "test.jsonl")[0]["messages"][0]["content"]
    append_escalation(folder / "escalations.jsonl", test_prompt)  # an escalated copy of a test prompt
    assert main(["retrain", str(recipe_path), "--runs-dir", str(runs)]) == 0
    return folder, recipe_path, runs / "e2e"


def conversation_for(i: int, prompt: str) -> list[dict]:
    """Every other request as an app sends it: per-request context and an earlier exchange."""
    if i % 2:
        return [{"role": "user", "content": prompt}]
    return [
        {"role": "system", "content": f"Customer #{i}: Premium since {2010 + i}. Classify the last message."},
        {"role": "user", "content": "hi, I have a question"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": prompt},
    ]


def unseen_prompts(limit: int) -> list[str]:
    rows = read_jsonl(ROOT / "data" / "prompts.jsonl")
    return [r["prompt"] for r in rows[limit : limit + SERVED_PROMPTS]]


def serve_round_zero(recipe_path: Path, run: Path, prompts: list[str]) -> None:
    """The evaluated policy of round 0 decides; the teacher answers what it escalates."""
    from pipeline.config import load_recipe
    from pipeline.llm.policy import Policy
    from pipeline.router.app import create_app
    from pipeline.router.backends import StudentBackend, TeacherBackend
    from pipeline.router.escalations import EscalationLog
    from pipeline.router.settings import ServeSettings
    from pipeline.task import load_task

    cfg = load_recipe(str(recipe_path))
    policy = Policy.load(run / "evaluate" / "router_policy.json")
    teacher = TeacherBackend(cfg.teacher, load_task(cfg.capture.task), cfg.capture.cache)
    app = create_app(
        ServeSettings(max_tokens=8),
        {"distill-student": StudentBackend(run / "export" / "merged")},
        policy,
        teacher=teacher,
        escalations=EscalationLog(cfg.serve.escalations),
    )
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for i, prompt in enumerate(prompts):
            client.chat.completions.create(model="distill-student", max_tokens=8, messages=conversation_for(i, prompt))


def append_escalation(path: Path, prompt: str) -> None:
    line = {
        "id": "dup-of-test",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "track_order"}],
        "meta": {"source": "router", "reason": "low_confidence"},
    }
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def prompts_of(path: Path) -> set[str]:
    return {json.dumps(r["messages"][:-1]) for r in read_jsonl(path)}


def test_every_served_request_that_escalated_was_logged_as_a_record(loop_run):
    folder, _, _ = loop_run
    logged = read_jsonl(folder / "escalations.jsonl")
    assert len(logged) == SERVED_PROMPTS + 1  # the policy of a tiny random student escalates everything
    assert all(r["meta"]["source"] == "router" for r in logged)
    prompts = unseen_prompts(32)
    assert [r["messages"][:-1] for r in logged[:-1]] == [conversation_for(i, p) for i, p in enumerate(prompts)]


def test_the_round_trained_on_whole_conversations(loop_run):
    """The escalated conversations train round 1 as they were sent; their system prompts vary, so
    the candidate reads conversations, and its policy and export say so."""
    from pipeline.llm.policy import Policy

    _, _, run = loop_run
    r1 = run / "rounds" / "r1"
    trained = [r for s in ("train", "validation") for r in read_jsonl(r1 / "curate" / f"{s}.jsonl")]
    multi = [r for r in trained if r["messages"][0]["role"] == "system"]
    assert multi and all(len(r["messages"]) == 5 and r["messages"][2]["role"] == "assistant" for r in multi)
    assert json.loads((r1 / "curate" / "student_input.json").read_text())["shape"] == "conversation"
    assert Policy.load(r1 / "evaluate" / "router_policy.json").student_input == "conversation"
    assert read_manifest(r1 / "export").student_input == "conversation"
    assert Policy.load(run / "evaluate" / "router_policy.json").student_input == "user"  # round 0 read user turns


def test_round_one_is_judged_on_round_zeros_test_ids(loop_run):
    _, _, run = loop_run
    round_zero = [r["id"] for r in read_jsonl(run / "curate" / "test.jsonl")]
    round_one = [r["id"] for r in read_jsonl(run / "rounds" / "r1" / "curate" / "test.jsonl")]
    assert round_one == round_zero
    report = json.loads((run / "rounds" / "r1" / "compare" / "report.json").read_text())
    assert report["frozen_test"]["delta"]["n"] == min(8, len(round_zero))  # eval.limit of both rounds


def test_no_test_or_held_back_prompt_trains_even_when_escalated(loop_run):
    _, _, run = loop_run
    r1 = run / "rounds" / "r1"
    trained = prompts_of(r1 / "curate" / "train.jsonl") | prompts_of(r1 / "curate" / "validation.jsonl")
    assert not trained & prompts_of(run / "curate" / "test.jsonl")
    assert not trained & prompts_of(r1 / "gather" / "escalated_slice.jsonl")
    summary = json.loads((r1 / "gather" / "gather.json").read_text())
    assert summary["skipped"] == {"test_or_slice": 1}


def test_the_round_trained_on_the_new_escalations_without_asking_the_teacher(loop_run):
    _, _, run = loop_run
    r1 = run / "rounds" / "r1"
    summary = json.loads((r1 / "gather" / "gather.json").read_text())
    assert summary["added"] + summary["escalated_slice"] == SERVED_PROMPTS and summary["added"] > 0
    assert read_manifest(r1 / "capture").counts["teacher_calls"] == 0
    added = {r["id"] for r in read_jsonl(r1 / "gather" / "gathered.jsonl") if r["meta"].get("round") == 1}
    curated = {r["id"] for s in ("train", "validation") for r in read_jsonl(r1 / "curate" / f"{s}.jsonl")}
    assert added & curated


def test_registry_holds_both_rounds_with_their_aliases_and_tags(loop_run):
    from pipeline.registry import CANDIDATE, CHAMPION, Registry

    folder, _, run = loop_run
    reg = Registry(f"sqlite:///{folder / 'mlflow.db'}")
    champion, candidate = reg.require("e2e", CHAMPION), reg.require("e2e", CANDIDATE)
    assert champion.source.resolve() == (run / "export" / "merged").resolve() and champion.round == 0
    assert candidate.source.resolve() == (run / "rounds" / "r1" / "export" / "merged").resolve()
    assert candidate.round == 1 and candidate.tags["compare.verdict"] in ("promote", "keep")
    report = json.loads((run / "rounds" / "r1" / "compare" / "report.json").read_text())
    assert report["versions"] == {"champion": champion.version, "candidate": candidate.version}
    assert candidate.tags["compare.significantly_worse"] == str(report["significantly_worse"]).lower()


def test_mlflow_shows_the_round_and_its_comparison(loop_run):
    import mlflow

    folder, _, _ = loop_run
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    names = set(mlflow.search_runs(experiment_names=["e2e"], output_format="pandas")["tags.mlflow.runName"])
    assert {"e2e", "e2e/r1", "e2e/r1/compare"} <= names


def test_retraining_on_the_same_log_again_adds_nothing_and_is_refused(loop_run, capsys):
    _, recipe, run = loop_run
    assert main(["retrain", str(recipe), "--runs-dir", str(run.parent)]) == 1
    assert "round 2: 0 new training records" in capsys.readouterr().err
    assert not (run / "rounds" / "r2" / "capture").exists()


def test_promote_and_rollback_move_the_champion(loop_run, capsys):
    """Leaves the registry's aliases as the round left them, so other tests read the same registry
    whatever the order they run in."""
    from pipeline.registry import CANDIDATE, CHAMPION, PREVIOUS, Registry

    folder, recipe, _ = loop_run
    reg = Registry(f"sqlite:///{folder / 'mlflow.db'}")
    round_zero, candidate = reg.require("e2e", CHAMPION).version, reg.require("e2e", CANDIDATE).version
    try:
        assert main(["promote", str(recipe), "--force"]) == 0
        assert reg.require("e2e", CHAMPION).round == 1 and reg.require("e2e", PREVIOUS).version == round_zero
        assert main(["rollback", str(recipe)]) == 0
        assert reg.require("e2e", CHAMPION).version == round_zero
        assert "back to version" in capsys.readouterr().out
    finally:
        reg.set_alias("e2e", CHAMPION, round_zero)
        reg.set_alias("e2e", CANDIDATE, candidate)
        reg.drop_alias("e2e", PREVIOUS)


def test_warm_start_trains_on_from_the_given_adapter(loop_run, tmp_path):
    """train.init_adapter (retrain.warm_start): with a vanishing learning rate the adapter stays the
    champion's; a fresh LoRA would start from B = 0 instead."""
    from safetensors.torch import load_file

    from pipeline.config import load_recipe
    from pipeline.stages import finetune
    from pipeline.tracking import NullTracker

    _, recipe_path, run = loop_run
    champion = run / "finetune" / "adapter"
    cfg = load_recipe(
        str(recipe_path),
        [f"train.init_adapter={champion}", "train.lr=1e-12", "train.max_steps=1", "train.eos_check='off'"],
    )
    finetune.run(cfg, {"curate": run / "curate"}, tmp_path, NullTracker())
    before, after = (
        load_file(champion / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and any(before[k].abs().sum() > 0 for k in lora_b)  # a trained adapter, not a fresh one
    for key in before:
        assert (after[key] - before[key]).abs().max() < 1e-6, key
