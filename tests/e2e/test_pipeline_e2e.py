"""End to end at tiny size: the real stages, the embedded teacher, a tiny random student.

One module-scoped run feeds most assertions; the interrupt test uses a real subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.e2e_recipe import write_recipe

from pipeline.artifacts import hash_outputs, read_manifest
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["capture", "curate", "finetune", "evaluate", "export"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_llama_dir):
    folder = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(folder, tiny_llama_dir)
    runs = folder / "runs"
    assert main(["run", str(recipe), "--runs-dir", str(runs)]) == 0
    return folder, recipe, runs / "e2e"


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_each_stage_wrote_exactly_its_artifacts(pipeline_run):
    _, _, run = pipeline_run
    assert files_under(run / "capture") == {"teacher.jsonl", "resolved_config.yaml", "manifest.json"}
    curate = files_under(run / "curate")
    assert {
        "train.jsonl",
        "validation.jsonl",
        "test.jsonl",
        "card.md",
        "manifest.json",
        "dataset/dataset_dict.json",
    } <= curate
    assert not [f for f in curate if "cache-" in f], "a later stage wrote cache files into the curated data"
    assert files_under(run / "finetune") >= {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "train_log.jsonl",
    }
    assert not (run / "finetune" / "checkpoints").exists()
    assert files_under(run / "evaluate") == {
        "report.json",
        "report.md",
        "predictions.jsonl",
        "router_policy.json",
        "confusion.png",
        "reliability.png",
        "risk_coverage.png",
        "cost_quality.png",
        "resolved_config.yaml",
        "manifest.json",
    }
    assert {
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer.json",
        "merged/chat_template.jinja",
        "merged/generation_config.json",
        "verification.json",
        "parity.json",
        "parity.md",
        "README.md",
    } <= files_under(run / "export")
    assert not list(run.glob("*.partial")), "no partial folder survives a successful run"
    assert (run.parent / "latest").resolve() == run.resolve()


def test_each_stage_folder_records_the_recipe_it_ran_with(pipeline_run):
    _, recipe, run = pipeline_run
    for stage in STAGES:
        resolved = yaml.safe_load((run / stage / "resolved_config.yaml").read_text())
        assert resolved["name"] == "e2e" and resolved["train"]["max_steps"] == 2, stage
        assert resolved["teacher"]["max_new_tokens"] == 6  # no over-eager redaction of *_tokens


def test_manifests_hash_what_is_on_disk_and_chain_lineage(pipeline_run):
    _, _, run = pipeline_run
    manifests = {s: read_manifest(run / s) for s in STAGES}
    for stage, manifest in manifests.items():
        assert manifest.outputs == hash_outputs(run / stage), f"{stage} changed after its manifest"
    assert set(manifests["evaluate"].inputs) == {"task", "capture", "curate", "finetune"}
    assert manifests["capture"].counts["prompts"] == 32
    records = [json.loads(line) for line in (run / "capture" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 32 and len({r["id"] for r in records}) == 32
    assert all(r["messages"][-1]["role"] == "assistant" and r["meta"]["prompt_sha"] for r in records)


def test_training_moved_the_adapter_and_loss_was_finite(pipeline_run):
    _, _, run = pipeline_run
    metrics = read_manifest(run / "finetune").metrics
    assert metrics["trainable_params"] > 0 and metrics["trainable_params"] < metrics["total_params"]
    log = [json.loads(line) for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]
    assert all(0 < row["loss"] < 100 for row in log)


def test_evaluation_report_matches_predictions(pipeline_run):
    _, _, run = pipeline_run
    report = json.loads((run / "evaluate" / "report.json").read_text())
    preds = [json.loads(line) for line in (run / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == report["test_examples"] > 0
    assert report["metrics"]["tuned_agreement"] == sum(p["tuned_agrees"] for p in preds) / len(preds)
    assert report["metrics"]["base_agreement"] == sum(p["base_agrees"] for p in preds) / len(preds)
    fig = report["figures"]["tuned_agreement"]
    assert fig["lo"] <= fig["value"] <= fig["hi"] and fig["n"] == len(preds)
    md = (run / "evaluate" / "report.md").read_text()
    assert md.index("| system | agreement with teacher") < md.index("## Routing threshold")
    assert all(f"]({png})" in md for png in report["plots"]) and len(report["plots"]) == 4
    assert report["base_weights"] == {
        "trained_against": "unquantised",
        "evaluated_on": "unquantised float32",
        "same": True,
    }
    assert "Base weights: the adapter was trained against the unquantised base" in md


def test_router_policy_names_its_signal_settings_and_adapter(pipeline_run):
    from pipeline.llm.policy import Policy

    _, _, run = pipeline_run
    policy = json.loads((run / "evaluate" / "router_policy.json").read_text())
    assert {"signal", "threshold", "bound", "quality_target", "settings", "adapter_sha256", "expected", "test"} <= set(
        policy
    )
    assert policy["settings"]["max_new_tokens"] == 4
    assert policy["adapter_sha256"] == read_manifest(run / "evaluate").inputs["finetune"]
    loaded = Policy.load(run / "evaluate" / "router_policy.json")
    if policy["threshold"] is None:  # fail closed, end to end through the served policy
        preds = [json.loads(line) for line in (run / "evaluate" / "predictions.jsonl").read_text().splitlines()]
        assert loaded.threshold is None and {p["route"] for p in preds} == {"escalate"}


def test_merged_export_reloads_with_plain_transformers_and_matches_adapter_logits(pipeline_run, tiny_llama_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, run = pipeline_run
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "finetune" / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(run / "export" / "merged")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "where is my order"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
    verification = json.loads((run / "export" / "verification.json").read_text())
    assert verification["mismatches"] == 0 and verification["expected"] == verification["merged"]


def test_mlflow_has_a_parent_run_and_one_nested_run_per_stage(pipeline_run):
    from mlflow.tracking import MlflowClient

    folder, _, _ = pipeline_run
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert "loss" in children["finetune"].data.metrics
    assert "tuned_agreement" in children["evaluate"].data.metrics
    assert {a.path for a in client.list_artifacts(children["curate"].info.run_id)} == {"card.md", "lengths.png"}
    assert "adapter" in [a.path for a in client.list_artifacts(children["finetune"].info.run_id)]


def test_second_run_skips_every_stage_and_calls_no_teacher(pipeline_run, capsys):
    folder, recipe, run = pipeline_run
    before = {s: read_manifest(run / s).created_at for s in STAGES}
    assert main(["run", str(recipe), "--runs-dir", str(run.parent)]) == 0
    assert {s: read_manifest(run / s).created_at for s in STAGES} == before
    out = capsys.readouterr().out
    assert "skipped (unchanged)" in out and "(0 teacher calls: unchanged)" in out


def test_changed_config_reruns_only_the_stages_it_affects(pipeline_run):
    _, recipe, run = pipeline_run
    before = {s: read_manifest(run / s).created_at for s in STAGES}
    assert main(["evaluate", str(recipe), "eval.max_new_tokens=3", "--runs-dir", str(run.parent)]) == 0
    after = {s: read_manifest(run / s).created_at for s in STAGES}
    assert [s for s in STAGES if after[s] != before[s]] == ["evaluate"]


def test_serving_and_planner_settings_rerun_no_stage(pipeline_run):
    _, recipe, run = pipeline_run
    assert main(["run", str(recipe), "--runs-dir", str(run.parent)]) == 0  # back to the recipe as written
    before = {s: read_manifest(run / s).created_at for s in STAGES}
    assert (
        main(
            [
                "run",
                str(recipe),
                "serve.port=9123",
                "serve.host=0.0.0.0",
                "model.architecture=mistral7b",
                "--runs-dir",
                str(run.parent),
            ]
        )
        == 0
    )
    assert {s: read_manifest(run / s).created_at for s in STAGES} == before


def test_eval_file_is_answered_by_the_teacher_and_scored_like_the_test_split(pipeline_run):
    folder, recipe, run = pipeline_run
    heldout = folder / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": p, "gold": g}) + "\n"
            for p, g in [
                ("my parcel never came", "track_order"),
                ("send me a VAT invoice", "invoice_request"),
                ("the vase arrived broken", "damaged_item"),
            ]
        )
    )
    assert main(["evaluate", str(recipe), f"eval.file={heldout}", "--runs-dir", str(run.parent)]) == 0
    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert report["heldout"]["n"] == 3 and "file_tuned_agreement" in report["figures"]
    assert "file_teacher_accuracy" in report["figures"] and "eval_file" in read_manifest(run / "evaluate").inputs
    assert "## On your held-out file" in (run / "evaluate" / "report.md").read_text()


def test_missed_gate_fails_evaluate_naming_the_figure_and_export_does_not_start(pipeline_run, capsys):
    from mlflow.tracking import MlflowClient

    folder, recipe, run = pipeline_run
    before = read_manifest(run / "export").created_at
    # The export override changes export's fingerprint: had the runner reached export, it would rerun.
    code = main(
        [
            "run",
            str(recipe),
            "eval.gate={tuned_agreement: 1.0}",
            "export.verify_prompts=1",
            "--runs-dir",
            str(run.parent),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "quality gate failed: tuned_agreement = " in err and "is below the bar 1.0" in err
    assert read_manifest(run / "export").created_at == before
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    latest = client.search_runs(
        [exp.experiment_id], "attributes.run_name = 'evaluate'", order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    assert latest.info.status == "FAILED"


def sigint_as_in_a_terminal() -> None:
    """Ctrl-C's default disposition for the child: a test run started in the background of a
    script (`make test &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_finetune_then_rerun_resumes_from_checkpoint(tmp_path, tiny_llama_dir):
    recipe = write_recipe(tmp_path, tiny_llama_dir, max_steps=40, save_steps=2)
    # `distill finetune`: the stages up to finetune, so the resumed run stops where the test does.
    cmd = [sys.executable, "-m", "pipeline", "finetune", str(recipe), "--runs-dir", str(tmp_path / "runs")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    checkpoints = tmp_path / "runs" / "e2e" / "finetune.partial" / "checkpoints"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "rerun the same command to resume" in output
    run = tmp_path / "runs" / "e2e"
    assert read_manifest(run / "finetune") is None and not (run / "finetune").exists()
    assert read_manifest(run / "curate") is not None

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "capture: unchanged" in second.stderr and "curate: unchanged" in second.stderr
    log = [json.loads(line) for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] > 1, "training restarted from step 1 instead of the checkpoint"
    assert log[-1]["step"] == 40
    assert read_manifest(run / "finetune").counts["steps"] == 40
