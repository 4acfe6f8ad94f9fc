"""Finetune: LoRA / QLoRA the student on the curated dataset with TRL's SFTTrainer.

    distill finetune RECIPE         (make finetune RECIPE=smollm2-135m-cpu)

Loss is on the completion (assistant answer) only: examples are fed as conversational
prompt/completion pairs, so no chat-template generation markers are needed. Checkpoints
go to `checkpoints/` every train.save_steps; an interrupted run resumes from the last one.
Writes `adapter/` (PEFT adapter + tokenizer) and `train_log.jsonl`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.artifacts import Manifest, write_jsonl
from pipeline.config import LoraConfig, Recipe, TrainConfig
from pipeline.errors import DistillError
from pipeline.models import DevicePlan

NAME = "finetune"
SECTIONS = ("model", "train")
UPSTREAM = ("curate",)


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    return {"chat_template": recipe.model.chat_template} if recipe.model.chat_template else {}


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk
    from trl import SFTTrainer

    from pipeline.models import device_plan, load_model, load_tokenizer

    cfg = recipe.train
    plan = device_plan(want_4bit=cfg.quant.load_in_4bit, allow_cpu_4bit=cfg.quant.on_cpu == "run")
    dataset = load_from_disk(str(inputs["curate"] / "dataset"), keep_in_memory=True)
    train = to_prompt_completion(dataset["train"])
    tokenizer = load_tokenizer(recipe.model.base, recipe.model.chat_template)
    model = load_model(recipe.model.base, plan, cfg.quant)
    if plan.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)

    log_rows: list[dict] = []
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(cfg, out / "checkpoints", plan),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora),
        callbacks=[_metrics_callback(tracker, log_rows)],
    )
    tracker.params({"train": cfg.model_dump(mode="json"), "base": recipe.model.base, "device": plan.reason})
    trainable, total = _count_params(trainer.model)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=_last_checkpoint(out / "checkpoints"))
    wall = time.perf_counter() - start

    trainer.model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is the product
    write_jsonl(out / "train_log.jsonl", log_rows)
    tokens = _real_tokens(trainer.train_dataset) * result.metrics.get("epoch", cfg.epochs)
    metrics = {
        "train_loss": result.training_loss,
        "first_loss": log_rows[0]["loss"] if log_rows else None,
        "last_loss": log_rows[-1]["loss"] if log_rows else None,
        "train_wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "trainable_params": trainable,
        "total_params": total,
    }
    _check_loss(metrics)
    tracker.metrics(metrics)
    tracker.artifact(out / "adapter", "adapter")
    return Manifest(stage=NAME, counts={"train_examples": len(train), "steps": result.global_step}, metrics=metrics)


def to_prompt_completion(split):
    """Curated rows -> TRL conversational prompt/completion (loss on the completion only).

    In memory: a cache file beside the curated data would change an upstream artifact."""
    return split.map(
        lambda ex: {
            "prompt": [{"role": "user", "content": ex["prompt"]}],
            "completion": [{"role": "assistant", "content": ex["completion"]}],
        },
        remove_columns=split.column_names,
    )


def build_lora_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_sft_config(cfg: TrainConfig, output_dir: Path, plan: DevicePlan):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of all steps
        optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_seq_len,
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        completion_only_loss=True,
        bf16=plan.dtype_name == "bfloat16",
        fp16=plan.dtype_name == "float16",
        use_cpu=plan.device == "cpu",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _metrics_callback(tracker, rows: list[dict]):
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        """Send the trainer's loss / lr logs to our tracker and keep them for train_log.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in numeric:
                rows.append({"step": state.global_step, **numeric})
            tracker.metrics(numeric, step=state.global_step)

    return TrackerCallback()


def _last_checkpoint(folder: Path) -> str | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def _count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _real_tokens(dataset) -> int:
    """Non-padding tokens per epoch (what tokens/s should count)."""
    return sum(len(ids) for ids in dataset["input_ids"])


def _check_loss(metrics: dict) -> None:
    loss = metrics["train_loss"]
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise DistillError(f"finetune: training loss is not finite ({json.dumps(loss)}); lower train.lr")
