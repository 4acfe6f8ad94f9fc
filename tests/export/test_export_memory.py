"""Export holds one copy of the model at a time: base + adapter are recorded, merged, saved and freed
before the merged folder is loaded back, and the F16 GGUF is held to that reloaded model in its own
dtype (no second, fp32 copy). On a 24 GB A10G a bf16 7B is 13.5 GiB: two copies do not fit.

    .venv/bin/pytest -q tests/export/test_export_memory.py

The model is a 2-layer Llama with SmolLM2's 49k vocabulary and untied embeddings (~13M parameters,
50 MB in fp32), large enough that one copy is told from two by counting the storage of every live
`torch.nn.Parameter` (garbage-collector-tracked objects, reachable or not) at the moment each
reload returns.
"""

import gc
import json
from pathlib import Path

import torch

from pipeline.artifacts import Manifest, hash_outputs, write_manifest
from pipeline.config import Recipe
from pipeline.stages import export
from pipeline.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["where is my parcel", "cancel my order please", "the item arrived broken", "refund me"]


def live_parameter_bytes() -> int:
    """Bytes of every distinct storage behind a live Parameter (nothing is collected first: objects
    in unreachable cycles still hold their memory until the collector runs)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and isinstance(obj, torch.nn.Parameter) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def finished(folder: Path, stage: str) -> Path:
    write_manifest(folder, Manifest(stage=stage, outputs=hash_outputs(folder)))
    return folder


def stage_inputs(root: Path, embedded_dir: Path, dtype: torch.dtype) -> tuple[Path, dict]:
    """A base saved in `dtype` and curate / finetune / evaluate folders as those stages leave them."""
    from datasets import Dataset, DatasetDict
    from peft import LoraConfig, get_peft_model
    from support.tiny_models import save_tiny_llama
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    base = save_tiny_llama(
        root / "base", tokenizer, dtype=dtype, hidden_size=128, intermediate_size=256, tie_word_embeddings=False
    )
    tokenizer.save_pretrained(base)
    rows = [{"id": f"x{i}", "prompt": p, "completion": "track_order"} for i, p in enumerate(PROMPTS)]
    curate = root / "curate"
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:2]),
            "validation": Dataset.from_list(rows[:2]),
            "test": Dataset.from_list(rows[2:]),
        }
    ).save_to_disk(str(curate / "dataset"))
    finetune = root / "finetune"
    torch.manual_seed(1)
    adapted = get_peft_model(
        LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    adapted.save_pretrained(finetune / "adapter")
    tokenizer.save_pretrained(finetune / "adapter")
    del adapted
    evaluate = root / "evaluate"
    evaluate.mkdir()
    (evaluate / "report.json").write_text(json.dumps({"figures": {}}))
    inputs = {
        "task": ROOT / "data" / "task.yaml",
        "curate": finished(curate, "curate"),
        "finetune": finished(finetune, "finetune"),
        "evaluate": finished(evaluate, "evaluate"),
    }
    return base, inputs


def one_copy_bytes(base: Path, dtype: torch.dtype) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).parameters())
    return params * torch.tensor([], dtype=dtype).element_size()


def count_reloads(monkeypatch) -> list[int]:
    """Every reload of the merged folder, with the live parameter bytes right after it returned."""
    from pipeline.export import merged

    real = merged.reload_plain
    peaks: list[int] = []

    def reload_plain(*args, **kwargs):
        model = real(*args, **kwargs)
        peaks.append(live_parameter_bytes())
        return model

    monkeypatch.setattr(merged, "reload_plain", reload_plain)
    return peaks


def run_export(base: Path, inputs: dict, out: Path, **export_cfg):
    recipe = Recipe(
        name="mem",
        model={"base": str(base)},
        export={
            "verify_prompts": 2,
            "verify_max_new_tokens": 3,
            "parity_max_new_tokens": 2,
            "registry": False,
            **export_cfg,
        },
    )
    out.mkdir()
    return export.run(recipe, inputs, out, NullTracker())


def test_the_merged_folder_is_reloaded_after_base_plus_adapter_is_freed(tmp_path, embedded_dir, monkeypatch):
    """fp32 on the CPU: at the reload, the merged copy alone is alive (the stage keeps no reference to
    base + adapter, nor does export_merged); with the old flow it was two copies, 2.0x."""
    base, inputs = stage_inputs(tmp_path, embedded_dir, torch.float32)
    copy = one_copy_bytes(base, torch.float32)
    assert copy > 40e6  # large enough that other live tensors cannot blur one copy into two
    gc.collect()
    before = live_parameter_bytes()
    peaks = count_reloads(monkeypatch)
    manifest = run_export(base, inputs, tmp_path / "out", formats=["merged", "adapter"])
    assert manifest.counts["accepted"] == 2
    assert len(peaks) == 1
    ratio = (peaks[0] - before) / copy
    assert 0.9 < ratio < 1.3, f"{ratio:.2f} model copies alive when the merged folder was reloaded"


def test_f16_is_held_to_the_bf16_merged_model_without_an_fp32_reload(tmp_path, embedded_dir, monkeypatch):
    """The CUDA path's dtypes on the CPU (bf16 plan, bf16 base): the F16 references come from the
    reloaded bf16 model itself, held to the bf16 tolerance; no fp32 copy is loaded beside it."""
    from pipeline.llm import loading

    real_plan = loading.device_plan
    monkeypatch.setattr(
        loading,
        "device_plan",
        lambda *a, **k: (
            loading.DevicePlan("cpu", "bfloat16", False, "bf16 on the CPU: the CUDA path's dtypes")
            if not a and not k
            else real_plan(*a, **k)
        ),
    )
    base, inputs = stage_inputs(tmp_path, embedded_dir, torch.bfloat16)
    copy = one_copy_bytes(base, torch.bfloat16)
    gc.collect()
    before = live_parameter_bytes()
    peaks = count_reloads(monkeypatch)
    out = tmp_path / "out"
    run_export(base, inputs, out, formats=["merged", "gguf"], gguf_types=["f16"])
    assert len(peaks) == 1, f"the merged folder was loaded {len(peaks)} times (an fp32 reference copy?)"
    ratio = (peaks[0] - before) / copy
    assert 0.9 < ratio < 1.3, f"{ratio:.2f} bf16 copies alive when the merged folder was reloaded"
    verification = json.loads((out / "verification.json").read_text())
    assert verification["compute"] == "bfloat16 on cpu"
    from pipeline.export.merged import DEFAULT_F16_LOGPROB_TOLERANCE

    f16 = next(a for a in json.loads((out / "parity.json").read_text())["artifacts"] if a["artifact"] == "gguf-f16")
    assert f16["verify_logprob_tolerance"] == DEFAULT_F16_LOGPROB_TOLERANCE["bfloat16"]
    assert f16["verify_max_logprob_delta"] is not None


def test_the_f16_tolerance_follows_the_merged_models_dtype_unless_set():
    from pipeline.export.merged import f16_tolerance

    assert f16_tolerance(None, torch.float32) == 0.25
    assert f16_tolerance(None, torch.bfloat16) == f16_tolerance(None, torch.float16) == 0.5
    assert f16_tolerance(0.5, torch.bfloat16) == 0.5
