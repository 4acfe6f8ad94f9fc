"""Finetune: LoRA / QLoRA the student on the curated dataset with TRL's SFTTrainer.

    distill finetune RECIPE         (make finetune RECIPE=smollm2-135m-cpu)
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipeline finetune RECIPE   (multi-GPU)

Loss is on the final answer only. Each curated row becomes a conversational prompt/completion
pair: the prompt is what the student sees of the conversation (`student_messages`, in the shape
curate resolved: student_input.json), earlier assistant turns included as context, and the
completion the teacher's final answer. We tokenize it here with the chat template
(`tokenize_prompt_completion`): the prompt is rendered exactly as at inference
(add_generation_prompt=True), the completion is what the template appends, cut after the
end-of-turn token (the tokenizer's EOS), so the labels are the final answer's tokens plus EOS
and nothing else: earlier answers are masked out. TRL turns `completion_mask` into
labels, and the loss projects those answer positions alone onto the vocabulary (llm/trainer.py).
Before anything is loaded, a machine that would fail or crawl is refused (no CUDA for a QLoRA or
1B+ recipe, several GPUs without a launcher: llm.loading.check_training_device), and on CUDA the
VRAM planner checks the recipe fits. After training, the EOS check makes sure the student stops
by itself. Checkpoints go to `checkpoints/` every train.save_steps; an interrupted run resumes
from the last one.
With train.eval_steps the validation split's loss is logged beside the training loss.
Writes `adapter/` (PEFT adapter + tokenizer) and `train_log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.artifacts import CURATED_DATASET, FINETUNE_ADAPTER, Manifest, write_jsonl
from pipeline.config import LoraConfig, Recipe, TrainConfig
from pipeline.conversation import Shape, conversation_of, read_student_view, student_messages
from pipeline.distributed import accelerate_state
from pipeline.errors import DistillError
from pipeline.llm import soft_labels
from pipeline.llm.loading import DevicePlan
from pipeline.llm.trainer import trainer_class as answer_trainer

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

NAME = "finetune"
READS: tuple[str, ...] = ("model.base", "model.chat_template", "train")
UPSTREAM: tuple[str, ...] = ("curate",)
RESUMABLE = True  # checkpoints in the partial folder survive a Ctrl-C
ALL_RANKS = True  # every rank trains under accelerate launch; rank 0 writes
SYSTEM_METRICS = True

log = logging.getLogger(__name__)


def file_inputs(recipe: Recipe) -> dict[str, Path]:
    files = {"chat_template": recipe.model.chat_template} if recipe.model.chat_template else {}
    if recipe.train.init_adapter is not None:  # its weights, not its path: a retrained champion re-trains
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            files[f"init_adapter/{name}"] = Path(recipe.train.init_adapter) / name
    return files


def run(recipe: Recipe, inputs: dict[str, Path], out: Path, tracker) -> Manifest:
    from datasets import load_from_disk

    from pipeline.llm.loading import check_training_device, device_plan, load_model, load_tokenizer, varlen_attention

    cfg = recipe.train
    state = accelerate_state()  # one process normally; one per GPU (or CPU process) under a launcher
    check_training_device(recipe, state.num_processes)
    plan = device_plan(want_4bit=cfg.quant.load_in_4bit, allow_cpu_4bit=cfg.quant.on_cpu == "run")
    planned = check_vram(recipe, plan) if plan.device == "cuda" else None
    dataset = load_from_disk(str(inputs["curate"] / CURATED_DATASET), keep_in_memory=True)
    shape = read_student_view(inputs["curate"]).shape
    tokenizer = load_tokenizer(recipe.model.base, inputs.get("chat_template"))
    train_split = oversampled(dataset["train"])
    train = tokenize_dataset(to_prompt_completion(train_split, shape), tokenizer, cfg.max_seq_len, cfg.soft_labels)
    validation = validation_set(dataset, tokenizer, cfg, shape) if cfg.eval_steps else None
    # No peft.prepare_model_for_kbit_training for a 4-bit base: it upcasts embeddings, norms and
    # lm_head to fp32, and 4-bit layers return their input's dtype, so the whole residual stream
    # would run fp32 under bf16 (twice the activation memory the planner assumes, slower steps).
    # TRL already freezes the base and enables input gradients for checkpointing.
    cfg, attention = attention_plan(cfg, plan, *(varlen_attention() if needs_varlen(cfg, plan) else (None, "")))
    model: PreTrainedModel | PeftModel = load_model(recipe.model.base, plan, cfg.quant, attention)
    if cfg.init_adapter is not None:  # warm start (`retrain.warm_start`): keep training that adapter
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)

    log_rows: list[dict] = []
    trainer = answer_trainer()(
        model=model,
        args=build_sft_config(cfg, out / "checkpoints", plan),
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        peft_config=None if cfg.init_adapter is not None else build_lora_config(cfg.lora),
        callbacks=[_metrics_callback(tracker, log_rows, state.is_main_process)],
    )
    if cfg.soft_labels:
        trainer.data_collator = soft_labels.collate(trainer.data_collator)
    if state.is_main_process:
        tracker.params(
            {
                "model": recipe.model.model_dump(mode="json"),
                "train": cfg.model_dump(mode="json"),
                "device": plan.reason,
                "world_size": state.num_processes,
            }
        )
    trainable, total = _count_params(trainer.model)
    _reset_peak_memory(plan)
    resume = _last_checkpoint(out / "checkpoints")
    tokens_before = _tokens_at(resume)  # read now: checkpoint rotation may delete it during training
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start

    trainer.save_model(str(out / FINETUNE_ADAPTER))  # every rank calls it: FSDP/ZeRO gather here; rank 0 writes
    state.wait_for_everyone()
    if not state.is_main_process:
        return Manifest(stage=NAME, notes=[f"rank {state.process_index}: artifacts written by rank 0"])

    (out / FINETUNE_ADAPTER / "training_args.bin").unlink(
        missing_ok=True
    )  # a pickle of our args; not part of the product
    tokenizer.save_pretrained(out / FINETUNE_ADAPTER)
    write_jsonl(out / "train_log.jsonl", log_rows)
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    losses = [r["loss"] for r in log_rows if "loss" in r]
    eval_losses = [r["eval_loss"] for r in log_rows if "eval_loss" in r]
    metrics = {
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        **({"eval_loss": eval_losses[-1]} if eval_losses else {}),
        "train_wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_gib": _peak_memory_gib(plan),
        "vram_estimate_gib": planned,
        "base_4bit": float(plan.load_in_4bit),  # evaluate says which base the adapter learned against
    }
    _check_loss(metrics)
    tracker.metrics(metrics)
    tracker.artifact(out / FINETUNE_ADAPTER, FINETUNE_ADAPTER)

    stops = eos_check(trainer.model, tokenizer, dataset["validation"], cfg, out / FINETUNE_ADAPTER, shape)
    tracker.metrics({"eos_stop_rate": stops})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is the product
    counts = {"train_examples": len(train), "steps": result.global_step, "tokens": trainer.state.num_input_tokens_seen}
    return Manifest(stage=NAME, counts=counts, metrics={**metrics, "eos_stop_rate": stops})


# ---------------------------------------------------------------- data


def oversampled(split):
    """Each row repeated `weight` times (an escalation weighted by `retrain.escalation_weight`); the
    trainer shuffles, so the copies spread over the epoch. Curated datasets before weights: as they are."""
    weights = split["weight"] if "weight" in split.column_names else []
    if all(w == 1 for w in weights):
        return split
    rows = [i for i, w in enumerate(weights) for _ in range(w)]
    log.info("finetune: %d weighted examples trained on as %d rows", sum(w > 1 for w in weights), len(rows))
    return split.select(rows, keep_in_memory=True)


def to_prompt_completion(split, shape: Shape):
    """Curated rows -> TRL conversational prompt/completion (loss on the completion only): the
    prompt is what the student sees of the row's conversation, in `shape`.

    In memory: a cache file beside the curated data would change an upstream artifact."""
    return split.map(
        lambda ex: {
            "prompt": student_messages(conversation_of(ex), shape),
            "completion": [{"role": "assistant", "content": ex["completion"]}],
            "label_probs": ex.get("teacher_label_probs") or "",  # curated datasets before soft labels: none
        },
        remove_columns=split.column_names,
        keep_in_memory=True,
    )


def tokenize_prompt_completion(tokenizer, prompt: list[dict], completion: list[dict], max_len: int) -> dict:
    """One conversational pair -> input_ids + completion_mask (1 on the answer and its EOS).

    The prompt is tokenized exactly as generation will see it; the completion is what the
    template appends for the assistant turn, cut right after the tokenizer's EOS so the
    template's trailing text (ChatML's newline after <|im_end|>) is neither trained nor fed.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DistillError(
            "finetune: the chat template renders the prompt differently once the answer is appended, so training "
            "would not see what inference sees; fix or replace it (model.chat_template, see recipes/templates/)"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    if ids[: len(prompt_ids)] == prompt_ids:
        answer = ids[len(prompt_ids) :]
    else:
        # Tokens merged across the boundary (e.g. GPT-2 style pre-tokenizers split "\n\nword"
        # differently from a trailing "\n\n"). Inference sees prompt_ids and then generates, so
        # train on exactly that: the prompt's own tokens, then the answer tokenized on its own.
        answer = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos not in answer:
        raise DistillError(
            f"finetune: the chat template does not end the assistant turn with the EOS token {tokenizer.eos_token!r}, "
            "so the student would never learn to stop; set model.chat_template to a template that does"
        )
    answer = answer[: answer.index(eos) + 1]
    # Never cut to max_len here: tokenize_dataset drops what does not fit, as curate promises.
    return {"input_ids": prompt_ids + answer, "completion_mask": [0] * len(prompt_ids) + [1] * len(answer)}


def soft_targets(tokenizer, ex: dict, row: dict, max_len: int, weight: float) -> dict:
    """The answer tokens' soft targets from the teacher's label distribution; one-hot where it has none."""
    answer = [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    probs = soft_labels.parse_probs(ex["label_probs"], "finetune: curated training row")
    label_answers = {}
    if probs:
        probs = soft_labels.top_labels(probs)
        for label in probs:
            r = tokenize_prompt_completion(tokenizer, ex["prompt"], [{"role": "assistant", "content": label}], max_len)
            label_answers[label] = [t for t, m in zip(r["input_ids"], r["completion_mask"]) if m]
    ids, targets = soft_labels.token_targets(answer, label_answers, probs or {}, weight)
    return {soft_labels.SOFT_IDS: ids, soft_labels.SOFT_PROBS: targets}


def validation_set(dataset, tokenizer, cfg: TrainConfig, shape: Shape):
    """The validation split, tokenized as training is, for train.eval_steps."""
    if "validation" not in dataset or not len(dataset["validation"]):
        raise DistillError(
            "finetune: train.eval_steps is set but the curated dataset has no validation examples; "
            "unset it or give curate enough data for a validation split"
        )
    return tokenize_dataset(to_prompt_completion(dataset["validation"], shape), tokenizer, cfg.max_seq_len)


def tokenize_dataset(pairs, tokenizer, max_len: int, soft_weight: float = 0.0):
    """Tokenize every pair; drop, never truncate, those longer than max_len: a cut answer loses its
    EOS and teaches the student to stop mid-answer (or never). With soft_weight (train.soft_labels)
    each row also gets its answer tokens' soft targets (llm/soft_labels.py)."""

    def tokenize(ex):
        row = tokenize_prompt_completion(tokenizer, ex["prompt"], ex["completion"], max_len)
        return row | (soft_targets(tokenizer, ex, row, max_len, soft_weight) if soft_weight else {})

    if soft_weight and not any(p for p in pairs["label_probs"]):  # before tokenizing anything
        raise DistillError(
            "finetune: train.soft_labels is set but no curated training example carries the "
            "teacher's label distribution; set teacher.label_distribution=true (local teacher) "
            "or sample several answers per prompt (teacher.n > 1, teacher.temperature > 0)"
        )
    tokenized = pairs.map(tokenize, remove_columns=pairs.column_names, keep_in_memory=True)
    kept = tokenized.filter(lambda ex: len(ex["input_ids"]) <= max_len, keep_in_memory=True)
    if len(kept) < len(tokenized):
        log.warning(
            "finetune: %d examples dropped, not truncated: longer than train.max_seq_len=%d tokens",
            len(tokenized) - len(kept),
            max_len,
        )
    if not len(kept):
        raise DistillError(f"finetune: no training example fits train.max_seq_len={max_len}")
    return kept


def needs_varlen(cfg: TrainConfig, plan: DevicePlan) -> bool:
    return cfg.padding_free and plan.device == "cuda"


def attention_plan(
    cfg: TrainConfig, plan: DevicePlan, varlen: str | None, why: str = ""
) -> tuple[TrainConfig, str | None]:
    """Padding-free batches need a varlen attention kernel on CUDA; `varlen` is the one that loads
    here (llm.loading.varlen_attention), `why` says which or why none did.

    Without one, transformers turns the concatenated batch's position_ids into a dense
    block-diagonal mask, so SDPA gets no flash kernel and attends over every token of the
    micro-batch at once: padded batches are then the faster choice, and padding-free is not
    claimed. On CPU the mask path is what was measured fastest (bench/bench_finetune.py), so
    nothing changes there."""
    if not needs_varlen(cfg, plan):
        return cfg, None
    if varlen is not None:
        log.info("padding-free batches with %s varlen kernels (%s)", varlen, why)
        return cfg, varlen
    log.warning(
        "train.padding_free: %s, so padded batches with SDPA are used instead (pip install flash-attn, or "
        "reach the hub once so the kernel is cached)",
        why or "no varlen flash-attention kernel loads here",
    )
    return cfg.model_copy(update={"padding_free": False}), None


# ---------------------------------------------------------------- builders (our config -> library objects)


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


def _checkpointing_args(sft_config: type, enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers release reads: recent 5.x calls it
    `activation_checkpointing` and warns on the old `gradient_checkpointing`. Non-reentrant
    explicitly, not by whichever default is installed: reentrant checkpointing needs an input that
    requires grad and drops the LoRA gradients when the layer's input is frozen."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(sft_config)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


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
        max_grad_norm=cfg.max_grad_norm,
        **_checkpointing_args(SFTConfig, cfg.gradient_checkpointing),
        # Our tokenizer already cut to max_seq_len; TRL refuses max_length with padding-free unpacked batches.
        max_length=cfg.max_seq_len if cfg.packing or not cfg.padding_free else None,
        packing=cfg.packing,
        padding_free=cfg.padding_free,
        completion_only_loss=True,
        label_smoothing_factor=cfg.label_smoothing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        bf16=plan.dtype_name == "bfloat16",
        fp16=plan.dtype_name == "float16",
        use_cpu=plan.device == "cpu",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps,
        per_device_eval_batch_size=cfg.batch_size,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


# ---------------------------------------------------------------- checks


def check_vram(recipe: Recipe, plan: DevicePlan) -> float:
    """Plan peak memory for this GPU before loading; refuse (or warn) when it won't fit."""
    import torch

    from pipeline.llm.loading import local_rank, resolve_model
    from pipeline.planner import check_fits, estimate, format_estimate, load_architecture

    props = torch.cuda.get_device_properties(local_rank())
    total = props.total_memory / 1024**3
    base = recipe.model.base
    local = resolve_model(base) if base.startswith("embedded:") else base
    arch = load_architecture(local, recipe.model.architecture)
    if recipe.train.vram_check == "fail":
        est = check_fits(arch, recipe.train, props.name, total, plan.dtype_name)
    else:
        est = estimate(arch, recipe.train, plan.dtype_name)
        if est.total > total:
            log.warning(
                "finetune: estimated peak %s exceeds %s (%.1f GiB); training anyway (train.vram_check=warn)",
                format_estimate(est),
                props.name,
                total,
            )
    log.info("VRAM plan on %s (%.1f GiB): %s", props.name, total, format_estimate(est))
    return est.total


def eos_check(model, tokenizer, validation, cfg: TrainConfig, adapter: Path, shape: Shape) -> float:
    """Greedy answers to a few validation prompts must end with EOS within the expected length.

    Expected length: twice the longest reference answer (with its EOS) plus 8 tokens. A student
    that runs on is the classic symptom of EOS masked out of the labels or a template that
    never closes the turn; catching it here beats finding it behind the router."""
    from pipeline.llm.generate import generate_batch

    if cfg.eos_check == "off" or not len(validation):
        return float("nan")
    rows = validation.select(range(min(cfg.eos_check_prompts, len(validation))))
    longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    limit = 2 * longest + 8
    model.eval()
    gens = generate_batch(model, tokenizer, [student_messages(conversation_of(r), shape) for r in rows], limit)
    stopped = [g for g in gens if g.stopped]
    rate = len(stopped) / len(gens)
    if rate < 1.0:
        runaway = next(g for g in gens if not g.stopped)
        msg = (
            f"finetune: EOS check failed: the tuned student ended {len(stopped)} of {len(gens)} validation answers "
            f"with EOS {tokenizer.eos_token!r} within {limit} tokens (e.g. {runaway.text[:60]!r}...). It would never "
            f"stop by itself: check the chat template ends the assistant turn with EOS, train longer, or set "
            f"train.eos_check=warn. The adapter is in {adapter}."
        )
        if cfg.eos_check == "fail":
            raise DistillError(msg)
        log.warning(msg)
    return rate


def _check_loss(metrics: dict) -> None:
    loss = metrics["train_loss"]
    if loss != loss or loss in (float("inf"), float("-inf")):
        raise DistillError(f"finetune: training loss is not finite ({json.dumps(loss)}); lower train.lr")


# ---------------------------------------------------------------- tracking helpers


def _metrics_callback(tracker, rows: list[dict], main: bool):
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        """Send loss / lr / tokens-per-second to our tracker and keep them for train_log.jsonl."""

        def __init__(self):
            self.last = (time.perf_counter(), None)

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            if "eval_loss" not in numeric:  # an eval log (train.eval_steps) trains no tokens
                if self.last[1] is not None and now > self.last[0]:
                    numeric["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
                self.last = (now, tokens)
            if "loss" in numeric or "eval_loss" in numeric:
                rows.append({"step": state.global_step, **numeric})
            if main:
                tracker.metrics(numeric, step=state.global_step)

    return TrackerCallback()


def _last_checkpoint(folder: Path) -> str | None:
    checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def _tokens_at(checkpoint: str | None) -> int:
    """Tokens already seen when training resumes from `checkpoint` (they are not this run's work)."""
    if checkpoint is None:
        return 0
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def _count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(_logical_numel(p) for p in model.parameters())


def _logical_numel(param) -> int:
    """Weights a parameter stands for: a bitsandbytes 4-bit parameter packs several per stored
    element, and its quant_state keeps the original shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(shape.numel()) if shape is not None else param.numel()


def _reset_peak_memory(plan: DevicePlan) -> None:
    if plan.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib(plan: DevicePlan) -> float:
    """CUDA: peak allocated by torch (what the planner estimates). CPU: the process's peak RSS."""
    if plan.device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
