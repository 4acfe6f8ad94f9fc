"""What build_sft_config hands TRL, shown on what training then does: non-reentrant checkpointing,
gradient clipping at train.max_grad_norm, a validation loss every train.eval_steps, and the
parameter count of a real NF4 base (bitsandbytes packs several 4-bit weights per stored element).

    .venv/bin/pytest -q tests/finetune/test_finetune_args.py
"""

import json
import math
from pathlib import Path

import pytest
from support.finetune_helpers import LABELS, PROMPTS, recipe, spy_on_trainer

from pipeline.config import LoraConfig, Recipe, TrainConfig
from pipeline.errors import DistillError
from pipeline.llm.loading import DevicePlan
from pipeline.stages import finetune
from pipeline.tracking import NullTracker

CPU = DevicePlan("cpu", "float32", False, "test")


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """A curate-stage folder with train and validation splits (as test_finetune's)."""
    from datasets import Dataset, DatasetDict

    rows = [{"id": str(i), "prompt": p, "completion": LABELS[i % 4]} for i, p in enumerate(PROMPTS * 3)]
    folder = tmp_path_factory.mktemp("curate")
    DatasetDict({"train": Dataset.from_list(rows[:20]), "validation": Dataset.from_list(rows[20:])}).save_to_disk(
        str(folder / "dataset")
    )
    return folder


def test_checkpointing_is_non_reentrant_by_our_config_not_by_a_library_default(
    tiny_llama_dir, curated, tmp_path, monkeypatch
):
    args = finetune.build_sft_config(TrainConfig(gradient_checkpointing=True), tmp_path, CPU)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert finetune.build_sft_config(TrainConfig(), tmp_path, CPU).gradient_checkpointing_kwargs is None

    seen = {}

    def on_train_begin(model, **_):  # what the trainer installed on the decoder layers
        layer = model.get_base_model().model.layers[0]
        seen["on"] = layer.gradient_checkpointing
        seen["kwargs"] = layer._gradient_checkpointing_func.keywords

    spy_on_trainer(monkeypatch, on_train_begin=on_train_begin)
    finetune.run(
        recipe(tiny_llama_dir, max_steps=1, gradient_checkpointing=True), {"curate": curated}, tmp_path, NullTracker()
    )
    assert seen == {"on": True, "kwargs": {"use_reentrant": False}}


def one_sgd_step(base_dir: Path, tmp_path: Path, max_grad_norm: float) -> float:
    """L2 norm of the LoRA update after one plain-SGD step at lr 1: with clipping, at most max_grad_norm."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    rows = [
        {"prompt": p, "completion": c}
        for p, c in [
            ("my card never arrived", "card_arrival"),
            ("refund me", "refund"),
            ("top up failed", "top_up_failed"),
            ("lost my card", "lost_or_stolen_card"),
        ]
    ]
    train = finetune.tokenize_dataset(finetune.to_prompt_completion(Dataset.from_list(rows), "user"), tokenizer, 128)
    cfg = TrainConfig(
        max_steps=1,
        batch_size=4,
        lr=1.0,
        optim="sgd",
        scheduler="constant",
        warmup_ratio=0.0,
        max_grad_norm=max_grad_norm,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
    )
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        args=finetune.build_sft_config(cfg, tmp_path / f"clip-{max_grad_norm}", CPU),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=finetune.build_lora_config(cfg.lora),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return math.sqrt(sum(float((after[n].detach() - p).pow(2).sum()) for n, p in before.items()))


def test_max_grad_norm_clips_the_update(tiny_llama_dir, tmp_path):
    clipped = one_sgd_step(tiny_llama_dir, tmp_path, 1e-3)
    unclipped = one_sgd_step(tiny_llama_dir, tmp_path, 0.0)  # 0: no clipping
    assert 0 < clipped <= 1e-3 * 1.0001
    assert unclipped > 10 * clipped  # the gradient really was larger than the bar


def test_the_flagship_clips_as_the_qlora_paper_and_cpu_recipes_keep_the_default():
    from pipeline.config import load_recipe

    root = Path(__file__).resolve().parents[2]
    assert load_recipe("mistral7b", root=root).train.max_grad_norm == 0.3
    assert load_recipe("smollm2-135m-cpu", root=root).train.max_grad_norm == 1.0  # transformers' default
    with pytest.raises(Exception, match="train.max_grad_norm"):
        Recipe.model_validate({"name": "x", "train": {"max_grad_norm": -1}})


def test_eval_steps_logs_a_validation_loss(tiny_llama_dir, curated, tmp_path):
    manifest = finetune.run(
        recipe(tiny_llama_dir, max_steps=2, eval_steps=1), {"curate": curated}, tmp_path, NullTracker()
    )
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    evals = [row for row in log if "eval_loss" in row]
    assert [row["step"] for row in evals] == [1, 2] and all(math.isfinite(row["eval_loss"]) for row in evals)
    assert manifest.metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert manifest.metrics["first_loss"] is not None and manifest.metrics["last_loss"] is not None


def test_eval_steps_without_a_validation_split_is_a_clear_error(tiny_llama_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"id": str(i), "prompt": f"question {i}", "completion": "refund"} for i in range(4)]
    split = Dataset.from_list(rows)
    DatasetDict({"train": split}).save_to_disk(str(tmp_path / "curate" / "dataset"))  # no validation split
    with pytest.raises(DistillError, match="train.eval_steps is set but the curated dataset has no validation"):
        finetune.run(
            recipe(tiny_llama_dir, eval_steps=1), {"curate": tmp_path / "curate"}, tmp_path / "out", NullTracker()
        )


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float32"])
def test_parameter_count_of_a_real_nf4_model_is_the_unquantized_count(tiny_llama_dir, storage):
    """bitsandbytes stores 2 NF4 codes per uint8, 4 per bf16 and 8 per fp32 element (quant_storage);
    numel() of the packed tensor under-counts by that factor, the quant_state's shape does not."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir,
        device_map={"": "cpu"},
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=getattr(torch, storage),
        ),
    )
    packed = [p for p in quantized.parameters() if type(p).__name__ == "Params4bit"]
    assert packed and all(p.dtype == getattr(torch, storage) for p in packed)
    per_element = {"uint8": 2, "bfloat16": 4, "float32": 8}[storage]
    assert all(finetune._logical_numel(p) == p.numel() * per_element for p in packed)
    assert sum(p.numel() for p in quantized.parameters()) < plain  # what a naive count reports
    assert finetune._count_params(quantized)[1] == plain
