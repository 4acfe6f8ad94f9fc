"""The export stage on a tiny Llama: every format written, every artifact re-scored in its runtime,
the parity gate, the model card, the Modelfile, and versions in a real local MLflow registry.

    .venv/bin/pytest -q tests/export/test_export_stage.py
"""

import json
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import Manifest, hash_outputs, write_manifest
from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.export.parity import ArtifactParity
from pipeline.stages import export
from pipeline.tracking import Tracker

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    "where is my parcel",
    "cancel my order please",
    "the item arrived broken",
    "refund me",
    "change my address",
    "is this in stock",
    "wrong size sent",
    "my card was charged twice",
]


def finished(folder: Path, stage: str) -> Path:
    write_manifest(folder, Manifest(stage=stage, outputs=hash_outputs(folder)))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir):
    """curate, finetune and evaluate folders as those stages leave them, built directly."""
    from datasets import Dataset, DatasetDict
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("export-inputs")
    rows = [{"id": f"x{i}", "prompt": p, "completion": "track_order"} for i, p in enumerate(PROMPTS)]
    curate = root / "curate"
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:2]),
            "validation": Dataset.from_list(rows[:2]),
            "test": Dataset.from_list(rows[2:]),
        }
    ).save_to_disk(str(curate / "dataset"))
    (curate / "card.md").write_text(
        "# Dataset card\n\n## Splits\n\n| split | examples |\n|---|---|\n| test | 6 |\n"
        "\n## Other\n\nnot in the model card\n"
    )
    finetune = root / "finetune"
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model.save_pretrained(finetune / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(finetune / "adapter")
    evaluate = root / "evaluate"
    evaluate.mkdir()
    (evaluate / "report.json").write_text(
        json.dumps({"figures": {"tuned_agreement": {"value": 0.5, "lo": 0.25, "hi": 0.75, "n": 6}}})
    )
    (evaluate / "router_policy.json").write_text(json.dumps({"threshold": None}))
    return {
        "task": ROOT / "data" / "task.yaml",
        "curate": finished(curate, "curate"),
        "finetune": finished(finetune, "finetune"),
        "evaluate": finished(evaluate, "evaluate"),
    }


def recipe(base: Path, **export_cfg) -> Recipe:
    cfg = {
        "formats": ["merged", "adapter", "gguf"],
        "gguf_types": ["f16", "q8_0"],
        "verify_prompts": 2,
        "verify_max_new_tokens": 4,
        "parity_max_new_tokens": 4,
        **export_cfg,
    }
    return Recipe(name="tiny-export", model={"base": str(base)}, export=cfg)


def plant_wrong_eos(monkeypatch):
    """Quantize for real, then write a wrong EOS id into the file: a conversion bug, planted."""
    import struct

    from pipeline.export import gguf

    real = gguf.quantize

    def quantize(source, target, gguf_type):
        real(source, target, gguf_type)
        data = bytearray(target.read_bytes())
        at = data.index(b"tokenizer.ggml.eos_token_id") + len("tokenizer.ggml.eos_token_id")
        struct.pack_into("<I", data, at + 4, 3)
        target.write_bytes(bytes(data))

    monkeypatch.setattr(gguf, "quantize", quantize)


def crash_decoding(monkeypatch, gguf_type: str):
    """llama.cpp dies with SIGSEGV on the first decode of one type, as an AMX build does on AMX Xeons:
    the probe process really segfaults on that file (and probes the others for real)."""
    from pipeline.llm import gguf_runtime

    crash = (
        f"import os, signal, sys\nif sys.argv[1].endswith('-{gguf_type}.gguf'): os.kill(os.getpid(), signal.SIGSEGV)\n"
    )
    monkeypatch.setattr(gguf_runtime, "PROBE", crash + gguf_runtime.PROBE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, inputs, tiny_llama_dir):
    """One stage run, every format: F16 healthy, the Q8_0 file planted with a wrong EOS id, and
    Q4_K_M crashing llama.cpp on its first decode."""
    root = tmp_path_factory.mktemp("export-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    out = root / "export.partial"
    out.mkdir()
    with pytest.MonkeyPatch.context() as monkeypatch:
        plant_wrong_eos(monkeypatch)
        crash_decoding(monkeypatch, "q4_k_m")
        with tracker.run("export") as run_id:
            manifest = export.run(recipe(tiny_llama_dir, gguf_types=["f16", "q8_0", "q4_k_m"]), inputs, out, tracker)
    return out, manifest, uri, run_id


def test_every_format_is_written_with_its_parity_table_card_and_modelfile(exported):
    out, manifest, _, _ = exported
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {
        "merged/model.safetensors",
        "merged/generation_config.json",
        "merged/chat_template.jinja",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "gguf/model-f16.gguf",
        "gguf/model-q8_0.gguf",
        "gguf/model-q4_k_m.gguf",
        "gguf/Modelfile",
        "parity.json",
        "parity.md",
        "README.md",
        "verification.json",
    } <= files
    assert not [f for f in files if f.endswith(".tmp")]
    assert manifest.counts["accepted"] == 3 and manifest.counts["rejected"] == 2


def test_each_artifact_was_rescored_and_f16_held_to_merged_log_probabilities(exported):
    out, _, _, _ = exported
    rows = {r["artifact"]: r for r in json.loads((out / "parity.json").read_text())["artifacts"]}
    assert list(rows) == ["merged", "adapter", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m"]
    f16 = rows["gguf-f16"]
    assert f16["runtime"] == "llama.cpp" and 0 < f16["verify_max_logprob_delta"] < f16["verify_logprob_tolerance"]
    for name in ("merged", "gguf-f16", "gguf-q8_0"):
        assert rows[name]["agreement"]["n"] == 6 and rows[name]["tokens_per_s"] > 0 and rows[name]["load_s"] > 0
        assert rows[name]["eos_stop_rate"] is not None
    assert [rows[n]["status"] for n in rows] == ["accepted", "accepted", "accepted", "rejected", "rejected"]
    # file size / weights: the 49k-token vocab in the metadata dominates a tiny model, so only the order holds
    assert rows["gguf-q8_0"]["bits_per_weight"] < rows["gguf-f16"]["bits_per_weight"]
    table = (out / "parity.md").read_text()
    assert table.startswith("| artifact | size | bits/weight | load s | tok/s | agreement [95% CI] | Δ vs merged")


def test_the_merge_check_figures_are_in_the_manifest_and_verification_json(exported):
    out, manifest, _, _ = exported
    figures = json.loads((out / "verification.json").read_text())
    # the tiny Llama is fp32, as is the CPU compute: the strict bar
    assert figures["compute"] == "float32 on cpu" and figures["logprob_tolerance"] == 1e-3
    assert manifest.metrics["merged_verify_logprob_tolerance"] == 1e-3
    assert manifest.metrics["merged_verify_max_logprob_delta"] == figures["max_logprob_delta"] < 1e-3
    assert manifest.metrics["merged_verify_greedy_agreement"] == figures["greedy_agreement"] == 1.0


def test_a_gguf_that_crashes_llama_cpp_is_rejected_with_the_reason_and_the_rest_still_lands(exported):
    out, manifest, _, _ = exported
    rows = {r["artifact"]: r for r in json.loads((out / "parity.json").read_text())["artifacts"]}
    reason = rows["gguf-q4_k_m"]["reasons"][0]
    assert reason.startswith("llama.cpp crashed (SIGSEGV) decoding model-q4_k_m.gguf in a probe process")
    assert "make setup" in reason and rows["gguf-q4_k_m"]["agreement"] is None
    assert f"| rejected: {reason} |" in (out / "parity.md").read_text()
    assert rows["merged"]["status"] == rows["gguf-f16"]["status"] == "accepted"


def test_the_parity_gate_rejects_the_planted_broken_gguf_with_a_clear_message(exported):
    out, manifest, _, _ = exported
    assert manifest.notes[0] == (
        "gguf-q8_0 rejected: EOS id 3 in the GGUF, but the tokenizer's EOS is 2 "
        "('<|im_end|>'): llama.cpp runtimes would not stop where the model was trained to"
    )
    assert manifest.notes[1].startswith("gguf-q4_k_m rejected: llama.cpp crashed (SIGSEGV)")
    assert "FROM ./model-f16.gguf" in (out / "gguf" / "Modelfile").read_text()  # never the rejected file
    assert "Rejected (kept for inspection, not registered): gguf-q8_0: EOS id 3" in (out / "README.md").read_text()


def test_a_rejected_artifact_fails_the_stage_only_when_required(exported):
    out, _, _, _ = exported
    rows = [ArtifactParity(**r) for r in json.loads((out / "parity.json").read_text())["artifacts"]]
    export.check_required(rows, ["merged", "gguf-f16"], out / "parity.md")  # both accepted: no error
    with pytest.raises(DistillError, match=r"required artifact gguf-q8_0 rejected: EOS id 3 in the GGUF"):
        export.check_required(rows, ["gguf-q8_0"], out / "parity.md")


def test_model_card_and_modelfile_describe_the_accepted_artifacts(exported):
    out, _, _, _ = exported
    card = (out / "README.md").read_text()
    assert "| tuned_agreement | 0.500 | [0.250, 0.750] | 6 |" in card  # evaluate's headline with its CI
    assert "### Splits" in card and "not in the model card" not in card
    assert "vllm serve ./merged" in card and "ollama create tiny-export -f Modelfile" in card
    modelfile = (out / "gguf" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER temperature 0" in modelfile


def test_accepted_artifacts_and_only_those_are_registered_with_their_lineage(exported, inputs):
    from mlflow.tracking import MlflowClient

    from pipeline.artifacts import read_manifest, sha256_json

    out, manifest, uri, run_id = exported
    versions = MlflowClient(uri).search_model_versions("name='tiny-export'")
    assert manifest.counts["registered_versions"] == len(versions) == 3
    by_artifact = {v.tags["artifact"]: v for v in versions}
    assert set(by_artifact) == {"merged", "adapter", "gguf-f16"}
    f16 = by_artifact["gguf-f16"]
    assert f16.run_id == run_id and f16.source == str(out.parent / "export" / "gguf" / "model-f16.gguf")
    assert f16.tags["recipe"] == "tiny-export" and f16.tags["runtime"] == "llama.cpp"
    assert f16.tags["dataset_sha256"] == sha256_json(read_manifest(inputs["curate"]).outputs)
    assert {"adapter_sha256", "policy_sha256", "agreement", "agreement_ci", "bits_per_weight"} <= set(f16.tags)
