"""The finetune stage on tiny models: QLoRA for real, the EOS check, resume, MLflow."""

import json
from pathlib import Path

import pytest
from support.finetune_helpers import LABELS, PROMPTS, recipe, spy_on_trainer

from pipeline.config import Recipe
from pipeline.errors import DistillError
from pipeline.stages import finetune
from pipeline.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """A curate-stage folder: dataset/ with train and validation splits."""
    from datasets import Dataset, DatasetDict

    rows = [
        {"id": str(i), "prompt": p, "completion": LABELS[i % 4], "label": LABELS[i % 4]}
        for i, p in enumerate(PROMPTS * 3)
    ]
    folder = tmp_path_factory.mktemp("curate")
    DatasetDict(
        {
            "train": Dataset.from_list(rows[:20]),
            "validation": Dataset.from_list(rows[20:]),
            "test": Dataset.from_list(rows[20:]),
        }
    ).save_to_disk(str(folder / "dataset"))
    return folder


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random MistralForCausalLM (hidden 64) with a Mistral v0.3-style tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.add_special_tokens(
        {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]}
    )
    tok.chat_template = (ROOT / "recipes" / "templates" / "mistral-v0.3.jinja").read_text()
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- QLoRA, for real


def test_qlora_on_cpu_trains_lora_only_and_the_adapter_reloads(tiny_mistral_dir, curated, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    snapshots = {}

    def snapshot(tag):
        def hook(model, **_):
            snapshots[tag] = {n: p.detach().clone() for n, p in model.named_parameters()}
            snapshots["types"] = {n: type(p).__name__ for n, p in model.named_parameters()}

        return hook

    spy_on_trainer(monkeypatch, on_train_begin=snapshot("begin"), on_train_end=snapshot("end"))
    cfg = recipe(
        tiny_mistral_dir,
        method="qlora",
        quant={"load_in_4bit": True, "on_cpu": "run"},
        lora={"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"},
    )
    manifest = finetune.run(cfg, {"curate": curated}, tmp_path, NullTracker())

    assert manifest.counts["steps"] == 2
    assert manifest.metrics["base_4bit"] == 1.0  # evaluate's report says the adapter learned against NF4
    plain = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32)
    expected_total = sum(p.numel() for p in plain.parameters()) + manifest.metrics["trainable_params"]
    assert manifest.metrics["total_params"] == expected_total, "4-bit packed weights were under-counted"
    begin, end, types = snapshots["begin"], snapshots["end"], snapshots["types"]
    assert "Params4bit" in types.values(), "the base was not loaded in 4-bit"
    lora = [n for n in begin if "lora_" in n]
    frozen = [n for n in begin if "lora_" not in n]
    assert lora and frozen
    # Packed 4-bit codes are stored in a float32 tensor here, where some byte patterns read as NaN: compare bytes.
    moved = [n for n in frozen if not torch.equal(begin[n].view(torch.uint8), end[n].view(torch.uint8))]
    assert not moved, f"frozen base weights moved: {moved}"
    assert all(begin[n].abs().sum() == 0 and end[n].abs().sum() > 0 for n in lora if "lora_B" in n), (
        "LoRA B weights did not move from their zero init"
    )

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 42, 7, 99]])
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-6), "the adapter does not change the logits"


def test_qlora_keeps_the_residual_stream_in_the_compute_dtype(tiny_mistral_dir, curated, tmp_path):
    """A bf16 NF4 base stays bf16 once the trainer has it: embeddings, norms and lm_head are not
    upcast (peft's prepare_model_for_kbit_training did that), so activations stay bf16 too."""
    import torch
    from trl import SFTTrainer

    from pipeline.llm.loading import DevicePlan, load_model, load_tokenizer

    cfg = recipe(
        tiny_mistral_dir,
        method="qlora",
        quant={"load_in_4bit": True, "on_cpu": "run", "compute_dtype": "bfloat16"},
        gradient_checkpointing=True,
    ).train
    plan = DevicePlan("cpu", "bfloat16", True, "test: bf16 compute on CPU to see dtypes")
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    model = load_model(str(tiny_mistral_dir), plan, cfg.quant)
    train = finetune.tokenize_dataset(
        finetune.to_prompt_completion(curated_split(curated), "user"), tokenizer, cfg.max_seq_len
    )
    trainer = SFTTrainer(
        model=model,
        args=finetune.build_sft_config(cfg, tmp_path, plan),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=finetune.build_lora_config(cfg.lora),
    )
    base = trainer.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    seen = {}

    def record(name, tensor) -> None:  # hooks must return None, or they replace the module's input/output
        seen.setdefault(name, tensor.dtype)

    hooks = [
        base.model.layers[1].register_forward_pre_hook(lambda m, a: record("layer_input", a[0])),
        base.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, a, out: record("gate_proj", out)),
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trainer.model(torch.tensor([[1, 5, 42, 7]]))
    for hook in hooks:
        hook.remove()
    assert seen == {"layer_input": torch.bfloat16, "gate_proj": torch.bfloat16}


def curated_split(curated: Path):
    from datasets import load_from_disk

    return load_from_disk(str(curated / "dataset"), keep_in_memory=True)["train"]


# ---------------------------------------------------------------- EOS check


@pytest.fixture(scope="module")
def never_stopping_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """Planted: the final norm's weight is zero, so every logit is 0 and greedy always picks token 0,
    which is not EOS (<|im_end|> is 2). LoRA cannot undo it: nothing passes the zeroed norm."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.model.norm.weight.data.zero_()
    out = tmp_path_factory.mktemp("never-stops")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def test_a_student_that_never_stops_fails_the_stage(never_stopping_dir, curated, tmp_path):
    with pytest.raises(DistillError, match=r"EOS check failed: the tuned student ended 0 of 4 validation answers"):
        finetune.run(
            recipe(never_stopping_dir, max_steps=1, eos_check="fail"), {"curate": curated}, tmp_path, NullTracker()
        )
    assert (tmp_path / "adapter" / "adapter_config.json").is_file(), "the failing adapter is kept for inspection"


def test_eos_check_passes_a_student_that_stops(never_stopping_dir, curated):
    """Same planted model, but token 0 is declared the EOS: every answer stops at once."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import TrainConfig

    model = AutoModelForCausalLM.from_pretrained(never_stopping_dir)
    tok = AutoTokenizer.from_pretrained(never_stopping_dir)
    tok.eos_token = tok.convert_ids_to_tokens(0)
    validation = load_from_disk(str(curated / "dataset"))["validation"]
    assert finetune.eos_check(model, tok, validation, TrainConfig(), Path("adapter"), "user") == 1.0


def test_eos_check_warn_lets_the_stage_finish(never_stopping_dir, curated, tmp_path):
    manifest = finetune.run(
        recipe(never_stopping_dir, max_steps=1, eos_check="warn"), {"curate": curated}, tmp_path, NullTracker()
    )
    assert manifest.metrics["eos_stop_rate"] == 0.0


# ---------------------------------------------------------------- resume


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tiny_llama_dir, curated, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    cfg = recipe(tiny_llama_dir, max_steps=4, save_steps=2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    straight = tmp_path / "straight"
    finetune.run(cfg, {"curate": curated}, straight, NullTracker())

    class Interrupted(Exception):
        pass

    def crash_at_3(state, **_):
        if state.global_step == 3:
            raise Interrupted

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        spy_on_trainer(patch, on_step_end=crash_at_3)
        with pytest.raises(Interrupted):
            finetune.run(cfg, {"curate": curated}, resumed, NullTracker())
    assert finetune._last_checkpoint(resumed / "checkpoints").endswith("checkpoint-2")

    steps = []
    spy_on_trainer(monkeypatch, on_step_end=lambda state, **_: steps.append(state.global_step))
    manifest = finetune.run(cfg, {"curate": curated}, resumed, NullTracker())
    assert steps == [3, 4] and manifest.counts["steps"] == 4
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


# ---------------------------------------------------------------- MLflow


def test_mlflow_gets_the_recipe_curves_speed_memory_and_adapter(tiny_llama_dir, curated, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "ft")
    with tracker.run("finetune") as run_id:
        manifest = finetune.run(recipe(tiny_llama_dir, max_steps=3), {"curate": curated}, tmp_path / "out", tracker)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["train.lora.r"] == "16" and run.data.params["model.base"] == str(tiny_llama_dir)
    assert {"loss", "learning_rate", "tokens_per_s", "peak_memory_gib", "train_loss"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert manifest.metrics["tokens_per_s"] > 0 and manifest.metrics["peak_memory_gib"] > 0
    assert manifest.counts["tokens"] > 0
    assert "adapter" in [a.path for a in client.list_artifacts(run_id)]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]


def test_padding_free_on_cuda_needs_a_varlen_kernel_else_padded_sdpa_with_one_line(caplog):
    """Decided from the plan alone, so it is testable without a GPU: CPU keeps padding-free; CUDA with a
    varlen kernel that loaded (flash-attn, or the hub's prebuilt one) asks for it; CUDA without one
    falls back to padded SDPA batches, says why in one line, and no longer claims padding-free."""
    from pipeline.llm.loading import HUB_FLASH_ATTENTION, DevicePlan

    train = Recipe(name="t", train={"padding_free": True}).train
    cpu = DevicePlan("cpu", "float32", False, "cpu")
    cuda = DevicePlan("cuda", "bfloat16", True, "cuda")
    assert not finetune.needs_varlen(train, cpu) and finetune.needs_varlen(train, cuda)
    assert finetune.attention_plan(train, cpu, None) == (train, None)
    caplog.clear()
    padded, attention = finetune.attention_plan(train, cuda, None, "the hub kernel did not load (offline)")
    assert attention is None and padded.padding_free is False and train.padding_free is True
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "offline" in warnings[0] and "padded batches with SDPA" in warnings[0]
    assert finetune.attention_plan(train, cuda, "flash_attention_2", "installed") == (train, "flash_attention_2")
    assert finetune.attention_plan(train, cuda, HUB_FLASH_ATTENTION, "loaded") == (train, HUB_FLASH_ATTENTION)


def test_without_flash_attn_or_the_hub_the_varlen_probe_says_why_none_loads():
    """This machine: no flash-attn, the hub offline (conftest): the hub kernel cannot load, and the
    reason names it; on a CUDA box with the hub reachable the same call returns the kernel's name."""
    import importlib.util

    from pipeline.llm.loading import HUB_FLASH_ATTENTION, varlen_attention

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    name, why = varlen_attention()
    assert name is None and HUB_FLASH_ATTENTION in why and "did not load" in why
