"""GPU tier: a real QLoRA step at the full mistral7b shape, and the VRAM planner against the measured peak.

    make test-gpu        (needs CUDA and ~15 GB of free disk; a few minutes; writes bench/gpu.json)

`make test` deselects the `gpu` tests and they skip themselves without CUDA. The model is
Mistral-7B-Instruct-v0.3's exact shape (the planner's KNOWN_ARCHITECTURES entry) with random
bf16 weights, saved to a folder and loaded back by the project's own loader, so the path is
the finetune stage's: `device_plan` -> `attention_plan` -> `load_model` (NF4 through `build_bnb_config`) ->
TRL's SFTTrainer with `build_sft_config` /
`build_lora_config` from recipes/mistral7b.yaml's train section. Only what a smoke run must
change is overridden: 3 steps, grad_accum 1 (accumulation reuses the same buffers, so the
peak is the same), no checkpoints, no EOS check. Rows are pre-tokenized the way
`tokenize_dataset` hands them to TRL (input_ids + completion_mask), each exactly
train.max_seq_len tokens, so a padding-free micro-batch holds batch_size x max_seq_len
tokens: the planner's tokens_per_step. The answer fills all but the first 64 tokens of each
row, the most positions TRL's fused LM head scores, so the peak is the recipe's worst case.

Set DISTILL_GPU_MODEL_DIR to keep the random checkpoint (14.5 GB) for a rerun; otherwise
it lives in a temp folder removed afterwards. The same harness runs at a tiny shape on the
CPU in `make test` (the last tests here), so it cannot rot unseen between GPU loans.

Issue 17's defects 3-6 run on a small random Mistral (SMALL) beside it, each adding a section
to bench/gpu.json: `residual_stream` (dtypes in the trainer's forwards), `padding_free_vs_padded`
(same-rows loss, tokens/s, peak memory, whether flash-attn varlen was used), `export_bf16`
(the export check in bf16 on the GPU) and `nf4_vs_bf16` (the NF4-trained adapter's greedy
agreement on the NF4 and the bf16 base). Each has a CPU rehearsal at the tiny shape.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from support.random_mistral import TINY, prompts, random_rows, write_random_model

ROOT = Path(__file__).resolve().parents[2]
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"
RESULTS = ROOT / "bench" / "gpu.json"
SMOKE = ["train.max_steps=3", "train.grad_accum=1", "train.logging_steps=1", "train.eos_check='off'"]
# The CPU rehearsal: tiny rows, and a plain optimizer (paged 8-bit AdamW is CUDA-only).
CPU_SMOKE = SMOKE + ["train.max_seq_len=96", "train.batch_size=2", "train.optim=adamw_torch", "train.quant.on_cpu=run"]
# Defects 3-6 on the GPU: a small Mistral (Mistral's vocabulary, ~50M parameters): seconds a run.
SMALL = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1536,
    vocab_size=32768,
    tie_word_embeddings=False,
    head_dim=64,
)
SMALL_SMOKE = SMOKE + ["train.max_seq_len=512", "train.batch_size=4", "train.lr=2e-3"]
SMALL_PADDING = SMOKE + ["train.max_steps=6", "train.max_seq_len=1024", "train.batch_size=8"]
# padding-free vs padded: the same rows' loss, relative (bf16 kernels differ in summation order)
LOSS_RTOL = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 1e-4}


# Tolerance for the planner, against torch.cuda.max_memory_allocated() over the training steps.
# The estimate's CUDA-context share (planner.CUDA_CONTEXT_GIB) is not a tensor, so it is taken
# off before comparing. Lower bound 1.0: `check_fits` passes or refuses a recipe on this number,
# and an underestimate is the OOM an hour into a run that the planner exists to prevent. Upper
# bound 1.3: the planner keeps 10% for allocator fragmentation and rounds up where it cannot see
# (the chunked LM head's tiles); past 1.3x it would turn away recipes that fit (a 24 GB card
# refused for a 19 GB step).
LOW, HIGH = 1.0, 1.3
# NF4-trained adapter, greedy on 8 prompts it memorised: the bf16 base must give the NF4 base's
# answers on at least this share (a base that differs by more than quantization noise, or an
# adapter that does not carry over, falls under it). Not yet measured on a GPU: the first run says.
NF4_VS_BF16_FLOOR = 0.75
# CPU rehearsal of the same (NF4 vs fp32 base, 4 prompts, tiny model): see test_nf4_vs_unquantized_*.
NF4_VS_FP32_FLOOR = 0.75
WEIGHTS_TOLERANCE = 0.10  # the NF4 layout is plain arithmetic; 10% covers quant-state bookkeeping


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU: run `make test-gpu` on a machine with one")


# ---------------------------------------------------------------- harness (shared with the CPU rehearsal)


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    return StepTimer()


def snapshot(model) -> dict:
    """Every parameter copied to host memory (a copy even on CPU, where .cpu() would alias)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def same_bytes(a, b) -> bool:
    # Packed 4-bit codes live in a float tensor, where some byte patterns read as NaN: compare bytes.
    import torch

    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def qlora_run(
    folder: Path, overrides: list[str], adapter_out: Path | None = None, rows=None, device: str | None = None
) -> dict:
    """Train like the finetune stage for max_steps on random rows; return what happened and what it cost.
    The residual stream's dtypes are recorded during the training forwards (defect 3); with
    `adapter_out` the trained adapter is saved there (defect 6 reads it); `rows` replaces the random rows."""
    import torch
    from trl import SFTTrainer

    from pipeline.config import load_recipe
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer, varlen_attention
    from pipeline.planner import CUDA_CONTEXT_GIB, GIB, estimate, load_architecture
    from pipeline.stages.finetune import attention_plan, build_lora_config, build_sft_config, needs_varlen

    cfg = load_recipe("mistral7b", root=ROOT, overrides=overrides).train  # the model is `folder`
    plan = device_plan(want_4bit=cfg.quant.load_in_4bit, allow_cpu_4bit=cfg.quant.on_cpu == "run", device=device)
    cuda = plan.device == "cuda"
    # As the stage: padding-free only with a varlen kernel on CUDA (flash-attn or the hub's), else padded SDPA.
    cfg, attention = attention_plan(cfg, plan, *(varlen_attention() if needs_varlen(cfg, plan) else (None, "")))
    arch = load_architecture(str(folder))
    est = estimate(arch, cfg, plan.dtype_name)
    tokenizer = load_tokenizer(str(folder))
    if rows is None:
        rows = random_rows(cfg.max_steps * cfg.batch_size * cfg.grad_accum, cfg.max_seq_len, arch.vocab)

    alloc = (lambda: torch.cuda.memory_allocated() / GIB) if cuda else (lambda: 0.0)  # CPU: not measured
    before_load = alloc()
    start = time.perf_counter()
    model = load_model(str(folder), plan, cfg.quant, attention)
    weights = alloc() - before_load  # as the stage does: no k-bit preparation (it would upcast to fp32)
    load_s = time.perf_counter() - start

    args = build_sft_config(cfg, folder.parent / f"{folder.name}-checkpoints", plan)
    args.save_strategy, args.disable_tqdm = "no", True
    timer = step_timer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora),
        callbacks=[timer],
    )
    types = {n: type(p).__name__ for n, p in trainer.model.named_parameters()}
    begin = snapshot(trainer.model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    hooks, dtypes = residual_hooks(trainer.model)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    for hook in hooks:
        hook.remove()
    if adapter_out is not None:
        trainer.save_model(str(adapter_out))
    peak = torch.cuda.max_memory_allocated() / GIB - before_load if cuda else None
    reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None

    lora = [n for n in begin if "lora_" in n]
    frozen = [n for n in begin if "lora_" not in n]
    end = dict(trainer.model.named_parameters())
    frozen_moved = [n for n in frozen if not same_bytes(begin[n], end[n].detach().cpu())]
    lora_moved = [n for n in lora if not same_bytes(begin[n], end[n].detach().cpu())]
    tokens = cfg.batch_size * cfg.max_seq_len
    ends = timer.ends  # throughput from the end of step 1 on: kernels loaded, allocator warm
    est_alloc = est.total - CUDA_CONTEXT_GIB
    return {
        "device": plan.reason,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_total_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "versions": _versions(),
        "arch": asdict(arch),
        "params": arch.params,
        "train": {
            k: getattr(cfg, k)
            for k in (
                "max_seq_len",
                "batch_size",
                "grad_accum",
                "max_steps",
                "optim",
                "gradient_checkpointing",
                "padding_free",
                "packing",
            )
        }
        | {
            "lora_r": cfg.lora.r,
            "compute_dtype": plan.dtype_name,
            "tokens_per_step": tokens,
            "attention": attention or "sdpa",
        },
        "estimate_gib": est.parts() | {"total": est.total, "comparable_to_allocated": est_alloc},
        "measured_gib": {"weights_after_load": weights, "peak_allocated": peak, "peak_reserved": reserved}
        if cuda
        else None,
        "estimate_over_measured": est_alloc / peak if cuda else None,
        "band": [LOW, HIGH],
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "step_s": [b - a for a, b in zip([start, *timer.ends], timer.ends)],
        "tokens_per_s": tokens * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "load_s": load_s,
        "train_s": train_s,
        "residual_dtypes": {k: sorted(v) for k, v in dtypes.items()},
        # for the assertions; dropped from the JSON
        "_types": types,
        "_lora": lora,
        "_frozen": frozen,
        "_frozen_moved": frozen_moved,
        "_lora_moved": lora_moved,
        "_lora_b_zero_at_start": all(begin[n].abs().sum() == 0 for n in lora if "lora_B" in n),
    }


def _versions() -> dict:
    from importlib.metadata import version

    import torch

    out = {name: version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")}
    return out | {"cuda": torch.version.cuda}


_SECTIONS: dict[Path, dict] = {}  # per results file: the sections (defects 3-6) written in this session


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


SECTIONS = ("residual_stream", "padding_free_vs_padded", "export_bf16", "nf4_vs_bf16")


def write_results(record: dict, path: Path) -> None:
    """The mistral7b record at the top level, with the sections already in the file (bench/bench_gpu.py
    runs the small-model tests first, in another process) and those this session wrote kept beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.is_file() else {}
    kept = {k: v for k, v in current.items() if k in SECTIONS}
    path.write_text(json.dumps(_public(record) | kept | _SECTIONS.get(path, {}), indent=2, default=str) + "\n")


def write_section(name: str, record: dict, path: Path) -> None:
    """One measurement (defects 3-6) under its own key of the same file, beside whatever is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _SECTIONS.setdefault(path, {})[name] = _public(record)
    current = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(current | _SECTIONS[path], indent=2, default=str) + "\n")


# ---------------------------------------------------------------- defects 3-6 (issue 17), shared with the CPU rehearsal


def residual_hooks(model):
    """Forward hooks recording the dtypes of the residual stream (defect 3): the embeddings' output,
    every decoder layer's input and output, every gate_proj's output (LoRA included) and the final
    norm's output. Returns (hooks, {name: set of dtype names})."""
    import torch

    seen: dict[str, set[str]] = {}

    def record(name, tensor) -> None:  # hooks must return None, or they replace the module's input/output
        if isinstance(tensor, tuple):
            tensor = tensor[0] if tensor else None
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            seen.setdefault(name, set()).add(str(tensor.dtype).removeprefix("torch."))

    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("DecoderLayer"):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, args, kwargs: record("layer_input", args[0] if args else kwargs.get("hidden_states")),
                    with_kwargs=True,
                )
            )
            hooks.append(module.register_forward_hook(lambda m, args, out: record("layer_output", out)))
        elif name.endswith("mlp.gate_proj"):
            hooks.append(module.register_forward_hook(lambda m, args, out: record("gate_proj", out)))
        elif name.endswith("embed_tokens"):
            hooks.append(module.register_forward_hook(lambda m, args, out: record("embeddings", out)))
        elif name.endswith("model.norm"):
            hooks.append(module.register_forward_hook(lambda m, args, out: record("final_norm", out)))
    return hooks, seen


def assert_residual_stream_in(record: dict, dtype_name: str) -> None:
    seen = record["residual_dtypes"]
    assert {"embeddings", "layer_input", "layer_output", "gate_proj", "final_norm"} <= seen.keys(), seen
    wrong = {k: v for k, v in seen.items() if v != [dtype_name]}
    assert not wrong, (
        f"residual stream not in {dtype_name} during training (defect 3: a k-bit preparation upcast?): {wrong}"
    )


def variable_rows(n: int, max_len: int, vocab: int, seed: int = 0):
    """Pre-tokenized rows of different lengths (a quarter to all of max_len): padding has something to pad."""
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max_len // 4, max_len + 1, (n,), generator=gen).tolist()
    ids = [torch.randint(3, vocab, (n_,), generator=gen).tolist() for n_ in lengths]
    masks = [[0] * (n_ // 4) + [1] * (n_ - n_ // 4) for n_ in lengths]
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


def padding_comparison(folder: Path, overrides: list[str], device: str | None = None) -> dict:
    """Defect 4: the same rows as one padding-free micro-batch (with the attention implementation
    attention_plan picks: a varlen flash-attention kernel when one loads, else SDPA over a
    block-diagonal mask) and as a padded one (SDPA): the loss on the first micro-batch before any
    step, then max_steps of training for tokens/s and peak memory."""
    import torch
    from trl import SFTTrainer

    from pipeline.config import load_recipe
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer, varlen_attention
    from pipeline.planner import GIB, load_architecture
    from pipeline.stages.finetune import attention_plan, build_lora_config, build_sft_config, needs_varlen

    cfg = load_recipe("mistral7b", root=ROOT, overrides=overrides).train
    plan = device_plan(want_4bit=cfg.quant.load_in_4bit, allow_cpu_4bit=cfg.quant.on_cpu == "run", device=device)
    cuda = plan.device == "cuda"
    flash = importlib.util.find_spec("flash_attn") is not None
    varlen, why = varlen_attention() if needs_varlen(cfg, plan) else (None, "")
    staged, attention = attention_plan(cfg, plan, varlen, why)
    arch = load_architecture(str(folder))
    tokenizer = load_tokenizer(str(folder))
    rows = variable_rows(cfg.max_steps * cfg.batch_size * cfg.grad_accum, cfg.max_seq_len, arch.vocab)
    real_tokens = sum(len(r) for r in rows["input_ids"])
    out = {
        "device": plan.reason,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "flash_attn_installed": flash,
        "padding_free_attention": attention or "sdpa",
        "flash_attn_varlen": attention is not None,
        "varlen_why": why,
        "stage_trains_padding_free": staged.padding_free,  # what the finetune stage would do on this machine
        "rows": len(rows),
        "real_tokens": real_tokens,
        "max_seq_len": cfg.max_seq_len,
        "batch_size": cfg.batch_size,
        "steps": cfg.max_steps,
        "compute_dtype": plan.dtype_name,
    }
    for arm, padding_free, attn in (("padding_free", True, attention), ("padded", False, None)):
        arm_cfg = cfg.model_copy(update={"padding_free": padding_free})
        model = load_model(str(folder), plan, arm_cfg.quant, attn)
        args = build_sft_config(arm_cfg, folder.parent / f"{folder.name}-{arm}", plan)
        args.save_strategy, args.disable_tqdm = "no", True
        torch.manual_seed(cfg.seed)
        timer = step_timer()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            peft_config=build_lora_config(cfg.lora),
            callbacks=[timer],
        )
        first = [trainer.train_dataset[i] for i in range(cfg.batch_size)]
        batch = trainer._prepare_inputs(trainer.data_collator(first))
        trainer.model.eval()
        with torch.no_grad(), trainer.compute_loss_context_manager():
            loss = float(trainer.compute_loss(trainer.model, batch))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        ends = timer.ends
        per_step = real_tokens / cfg.max_steps
        out[arm] = {
            "attention": attn or "sdpa",
            "batch_shape": list(batch["input_ids"].shape),
            "first_batch_loss": loss,
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
            "train_s": train_s,
            "tokens_per_s": per_step * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        }
        del trainer, model, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    a, b = out["padding_free"]["first_batch_loss"], out["padded"]["first_batch_loss"]
    out["loss_rel_diff"] = abs(a - b) / abs(b)
    return out


def export_check(
    folder: Path,
    out: Path,
    device: str,
    dtype_name: str,
    drop_adapter: bool = False,
    n_prompts: int = 8,
    max_new_tokens: int = 4,
):
    """Defect 5: pipeline.export.merged.export_merged on base + a LoRA in `dtype_name` on `device`, the
    way the export stage runs it (merged weights saved in the base's dtype, reloaded in the compute
    dtype on the compute device). The LoRA has random non-zero A and B: a 3-step adapter from B=0
    moves nothing, so a dropped one could not be told apart. `drop_adapter`: the LoRA is removed
    instead of merged. Returns export_merged's MergedExport; raises DistillError when the check fails."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.export.merged import export_merged
    from pipeline.llm.loading import load_tokenizer
    from pipeline.planner import load_architecture

    dtype = getattr(torch, dtype_name)
    tokenizer = load_tokenizer(str(folder))

    def load_adapted():  # a loader: export_merged frees base + adapter before it reloads the merged folder
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()
        torch.manual_seed(1)
        adapted = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        ).eval()
        if drop_adapter:
            adapted.merge_and_unload = adapted.unload
        return adapted

    convs = prompts(n_prompts, load_architecture(str(folder)).vocab)
    return export_merged(load_adapted, tokenizer, convs, max_new_tokens, out, save_dtype=dtype)


def export_record(result, out: Path) -> dict:
    figures = json.loads((out / "verification.json").read_text())
    return {
        k: figures[k]
        for k in (
            "compute",
            "saved_dtype",
            "prompts",
            "greedy_agreement",
            "min_agreement",
            "max_logprob_delta",
            "logprob_tolerance",
            "adapter_logprob_effect",
        )
    } | ({"reload_s": result.load_s} if result is not None else {})


def answers_to_learn(folder: Path, n: int, length: int = 6, seed: int = 7) -> list[list[dict]]:
    """n prompts (as nf4_vs_bf16 asks them) with a random answer each: what the defect-6 adapter memorises."""
    import torch

    from pipeline.planner import load_architecture

    vocab = load_architecture(str(folder)).vocab
    gen = torch.Generator().manual_seed(seed + 1)
    answers = torch.randint(3, vocab, (n, length), generator=gen).tolist()
    return [[{"role": "assistant", "content": " ".join(f"t{i}" for i in a)}] for a in answers]


def memorise_rows(folder: Path, n: int, repeats: int, seed: int = 7):
    """The chat-rendered prompt/answer pairs, tokenized as the finetune stage does, each row `repeats` times."""
    from datasets import Dataset

    from pipeline.llm.loading import load_tokenizer
    from pipeline.planner import load_architecture
    from pipeline.stages.finetune import tokenize_prompt_completion

    tokenizer = load_tokenizer(str(folder))
    convs = prompts(n, load_architecture(str(folder)).vocab, seed=seed)
    pairs = [tokenize_prompt_completion(tokenizer, c, a, 4096) for c, a in zip(convs, answers_to_learn(folder, n))]
    rows = [pair for _ in range(repeats) for pair in pairs]
    return Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "completion_mask")})


def nf4_vs_bf16(
    folder: Path,
    adapter: Path,
    overrides: list[str],
    n_prompts: int = 8,
    max_new_tokens: int = 8,
    device: str | None = None,
) -> dict:
    """Defect 6: an adapter trained on the NF4 base, greedy on that NF4 base and on the unquantized
    base (bf16 on CUDA; fp32 on the CPU) the evaluate and export stages load. Figures: the share
    of prompts answered token for token alike (greedy_agreement) and the mean share of leading
    tokens alike (token_agreement), with the adapter and, for scale, for the base alone; and, for
    an adapter trained on memorise_rows, the share of its answers each base reproduces."""
    from dataclasses import replace

    import torch
    from peft import PeftModel

    from pipeline.config import load_recipe
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.planner import load_architecture

    cfg = load_recipe("mistral7b", root=ROOT, overrides=overrides).train
    nf4 = device_plan(want_4bit=True, allow_cpu_4bit=cfg.quant.on_cpu == "run", device=device)
    assert nf4.load_in_4bit, nf4.reason
    plans = {"nf4": nf4, "unquantized": replace(nf4, load_in_4bit=False)}
    tokenizer = load_tokenizer(str(folder))
    convs = prompts(n_prompts, load_architecture(str(folder)).vocab, seed=7)
    answers: dict[str, list[list[int]]] = {}
    for name, plan in plans.items():
        model = PeftModel.from_pretrained(load_model(str(folder), plan, cfg.quant), str(adapter)).eval()
        answers[f"{name}+adapter"] = [g.token_ids for g in generate_batch(model, tokenizer, convs, max_new_tokens)]
        with model.disable_adapter():
            answers[name] = [g.token_ids for g in generate_batch(model, tokenizer, convs, max_new_tokens)]
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
        same = sum(x == y for x, y in zip(a, b)) / len(a)
        leading = []
        for x, y in zip(a, b):
            k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            leading.append(k / max(len(x), len(y), 1))
        return same, sum(leading) / len(leading)

    target = [
        tokenizer(a[0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for a in answers_to_learn(folder, n_prompts)
    ]
    with_adapter = agreement(answers["nf4+adapter"], answers["unquantized+adapter"])
    base_only = agreement(answers["nf4"], answers["unquantized"])
    return {
        "device": nf4.reason,
        "unquantized_dtype": nf4.dtype_name,
        "prompts": n_prompts,
        "max_new_tokens": max_new_tokens,
        "greedy_agreement": with_adapter[0],
        "token_agreement": with_adapter[1],
        "base_greedy_agreement": base_only[0],
        "base_token_agreement": base_only[1],
        "learned_answer_agreement": {
            "nf4": agreement(answers["nf4+adapter"], target)[1],
            "unquantized": agreement(answers["unquantized+adapter"], target)[1],
        },
        "adapter_changes_nf4_answers": answers["nf4+adapter"] != answers["nf4"],
    }


def assert_agreement_figures(record: dict, floor: float) -> None:
    """Every figure is a share; the NF4-trained adapter's answers on the unquantized base agree with its
    answers on the NF4 base on at least `floor` of the prompts, and it learned its answers on both."""
    figures = {
        k: record[k] for k in ("greedy_agreement", "token_agreement", "base_greedy_agreement", "base_token_agreement")
    } | record["learned_answer_agreement"]
    for key, value in figures.items():
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    assert record["adapter_changes_nf4_answers"], "the adapter changed nothing: the comparison says nothing"
    learned = record["learned_answer_agreement"]
    assert learned["nf4"] >= floor, f"the adapter did not learn its answers on the NF4 base it trained on: {record}"
    assert record["greedy_agreement"] >= floor and learned["unquantized"] >= floor, (
        f"NF4-trained adapter on the unquantized base: greedy agreement {record['greedy_agreement']:.2f}, learned "
        f"answers {learned['unquantized']:.2f}, under the floor {floor}: {record}"
    )


def assert_trained_lora_only(record: dict) -> None:
    assert "Params4bit" in record["_types"].values(), "the base was not loaded in 4-bit"
    assert record["steps"] == 3
    losses = record["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), f"losses {losses}"
    # Random weights predict near-uniformly: about ln(vocab), never 0 or wildly above.
    ln_vocab = math.log(record["arch"]["vocab"])
    assert all(0.5 * ln_vocab < x < 2 * ln_vocab for x in losses), f"losses {losses}, ln(vocab) {ln_vocab:.2f}"
    assert record["_lora"] and record["_frozen"]
    assert not record["_frozen_moved"], f"frozen base weights moved: {record['_frozen_moved'][:5]}"
    assert record["_lora_b_zero_at_start"]
    unmoved_b = [n for n in record["_lora"] if "lora_B" in n and n not in record["_lora_moved"]]
    assert not unmoved_b, f"LoRA B weights did not move from their zero init: {unmoved_b[:5]}"


# ---------------------------------------------------------------- the GPU tier


@pytest.fixture(scope="module")
def mistral7b_dir(tmp_path_factory):
    from pipeline.planner import KNOWN_ARCHITECTURES

    keep = os.environ.get("DISTILL_GPU_MODEL_DIR")
    folder = Path(keep) if keep else tmp_path_factory.mktemp("mistral7b-random") / "model"
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_random_model(folder, KNOWN_ARCHITECTURES[MISTRAL], "cuda")
    print(f"random mistral7b checkpoint ready in {time.perf_counter() - start:.0f} s: {folder}")
    yield folder
    if not keep:  # pytest keeps its last three temp roots: 3 x 14.5 GB is too much disk
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def mistral7b_run(mistral7b_dir):
    record = qlora_run(mistral7b_dir, SMOKE, device="cuda")
    write_results(record, RESULTS)  # before any assertion: a failing run's numbers are the interesting ones
    print(
        json.dumps(
            {
                k: record[k]
                for k in ("gpu", "estimate_gib", "measured_gib", "estimate_over_measured", "losses", "tokens_per_s")
            },
            indent=1,
            default=str,
        )
    )
    return record


@gpu
@needs_cuda
def test_qlora_steps_on_the_full_mistral7b_shape_train_lora_only(mistral7b_dir, mistral7b_run):
    from pipeline.planner import KNOWN_ARCHITECTURES, Architecture, load_architecture

    assert load_architecture(str(mistral7b_dir)) == Architecture.from_config(KNOWN_ARCHITECTURES[MISTRAL])
    assert mistral7b_run["params"] == pytest.approx(7.25e9, rel=0.01)
    assert mistral7b_run["measured_gib"] is not None, f"trained on {mistral7b_run['device']}, not CUDA"
    assert_trained_lora_only(mistral7b_run)


@gpu
@needs_cuda
def test_vram_planner_estimate_brackets_the_measured_peak(mistral7b_run):
    est, measured = mistral7b_run["estimate_gib"], mistral7b_run["measured_gib"]
    weights = measured["weights_after_load"]
    assert abs(weights - est["weights"]) <= WEIGHTS_TOLERANCE * est["weights"], (
        f"NF4 base + bf16 embeddings measured {weights:.2f} GiB, planned {est['weights']:.2f} GiB"
    )
    peak, planned = measured["peak_allocated"], est["comparable_to_allocated"]
    assert LOW * peak <= planned <= HIGH * peak, (
        f"planner {planned:.2f} GiB (+{est['total'] - planned:.1f} GiB CUDA context = {est['total']:.2f}) vs measured "
        f"peak {peak:.2f} GiB allocated: ratio {planned / peak:.2f}, outside [{LOW}, {HIGH}]; parts {est}; see {RESULTS}"
    )


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-random") / "model"
    write_random_model(folder, SMALL, "cuda")
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def small_run(small_dir):
    record = qlora_run(small_dir, SMALL_SMOKE, device="cuda")
    write_section(
        "residual_stream",
        {k: record[k] for k in ("device", "gpu", "arch", "train", "residual_dtypes", "losses", "tokens_per_s")},
        RESULTS,
    )
    return record


@gpu
@needs_cuda
def test_qlora_keeps_the_residual_stream_in_bf16_on_cuda(small_run):
    """Defect 3: no k-bit preparation upcasting embeddings / norms / lm_head, so under bf16 the decoder
    layers' inputs and outputs and gate_proj's outputs stay bfloat16 in the trainer's own forwards."""
    assert small_run["train"]["compute_dtype"] == "bfloat16", small_run["device"]
    assert_trained_lora_only(small_run)
    assert_residual_stream_in(small_run, "bfloat16")


@gpu
@needs_cuda
def test_padding_free_and_padded_batches_give_the_same_loss_on_cuda(small_dir):
    """Defect 4: same rows, same loss; tokens/s, peak memory and the attention kernel go to bench/gpu.json
    (a measurement: no timing is asserted)."""
    record = padding_comparison(small_dir, SMALL_PADDING, device="cuda")
    write_section("padding_free_vs_padded", record, RESULTS)
    print(json.dumps(record, indent=1, default=str))
    assert record["padding_free"]["batch_shape"][0] == 1 and record["padded"]["batch_shape"][0] > 1
    assert record["loss_rel_diff"] <= LOSS_RTOL[record["compute_dtype"]], record
    # No dense-mask SDPA on CUDA: padding-free only with a varlen kernel, and then it is the one used.
    assert record["stage_trains_padding_free"] == record["flash_attn_varlen"], record["varlen_why"]
    for arm in ("padding_free", "padded"):
        assert all(math.isfinite(x) for x in record[arm]["losses"]) and record[arm]["peak_allocated_gib"] > 0


@gpu
@needs_cuda
def test_export_check_in_bf16_on_cuda_passes_a_merge_and_fails_a_dropped_adapter(small_dir, tmp_path):
    """Defect 5: the merged folder reloaded in bf16 on the GPU, as base + adapter ran, within the logits
    tolerance and greedy agreement; the same check refuses a merge that dropped the adapter."""
    import torch

    from pipeline.errors import DistillError
    from pipeline.export.merged import DEFAULT_LOGPROB_TOLERANCE

    good = export_check(small_dir, tmp_path / "good", "cuda", "bfloat16")
    record = {"correct_merge": export_record(good, tmp_path / "good")}
    param = next(good.model.parameters())
    try:
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16
        assert record["correct_merge"]["compute"].startswith("bfloat16 on cuda")
        assert record["correct_merge"]["max_logprob_delta"] < DEFAULT_LOGPROB_TOLERANCE["bfloat16"]
        with pytest.raises(DistillError, match=r"export: merged model"):
            export_check(small_dir, tmp_path / "dropped", "cuda", "bfloat16", drop_adapter=True)
    finally:
        if (tmp_path / "dropped" / "verification.json").is_file():
            record["dropped_adapter"] = export_record(None, tmp_path / "dropped")
        write_section("export_bf16", record, RESULTS)


MEMORISE = [
    "train.max_steps=40",
    "train.batch_size=8",
    "train.max_seq_len=512",
    "train.lr=5e-3",
    "train.warmup_ratio=0",
    "train.lora.dropout=0",
]


@gpu
@needs_cuda
def test_nf4_trained_adapter_on_the_nf4_and_the_bf16_base(small_dir, tmp_path):
    """Defect 6 (a measurement): an adapter trained on NF4 to answer 8 prompts, greedy on the NF4 base
    it trained against and on the bf16 base evaluate / export load: their agreement, and how much of
    the learned answers each reproduces."""
    overrides = SMOKE + MEMORISE
    qlora_run(
        small_dir, overrides, adapter_out=tmp_path / "adapter", rows=memorise_rows(small_dir, 8, 40), device="cuda"
    )
    record = nf4_vs_bf16(small_dir, tmp_path / "adapter", overrides, device="cuda")
    write_section("nf4_vs_bf16", record | {"floor": NF4_VS_BF16_FLOOR}, RESULTS)
    print(json.dumps(record, indent=1))
    assert record["unquantized_dtype"] == "bfloat16"
    assert_agreement_figures(record, NF4_VS_BF16_FLOOR)


# ---------------------------------------------------------------- CPU rehearsals of the same harness (in make test)
# Pinned to the CPU (device="cpu"), so on a CUDA box they still rehearse what they say. They check the
# harness itself, not what only a GPU shows: no memory is measured, paged 8-bit AdamW (CUDA-only) is
# replaced by adamw_torch, and compute is fp32.


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("tiny-random") / "tiny", TINY, "cpu")


@pytest.fixture(scope="module")
def tiny_run(tiny_dir):
    record = qlora_run(tiny_dir, CPU_SMOKE, adapter_out=tiny_dir.parent / "adapter", device="cpu")
    return record | {"_adapter": tiny_dir.parent / "adapter"}


def test_cpu_rehearsal_qlora_steps_train_lora_only_on_an_nf4_base_and_write_gpu_json(tiny_dir, tiny_run, tmp_path):
    """The mistral7b-shape harness at hidden 64 on the CPU's bitsandbytes NF4: LoRA moves, the NF4 base
    does not, the residual-stream hooks fire (fp32 here), and the results file keeps its sections."""
    from pipeline.planner import Architecture, load_architecture

    assert write_random_model(tiny_dir, TINY, "cpu") == tiny_dir  # reused, not rewritten
    assert load_architecture(str(tiny_dir)) == Architecture.from_config(TINY)
    record = tiny_run
    assert record["device"].startswith("CPU") and record["train"]["optim"] == "adamw_torch"
    assert_trained_lora_only(record)
    assert record["train"]["tokens_per_step"] == 2 * 96 and record["measured_gib"] is None
    assert_residual_stream_in(record, "float32")
    assert (record["_adapter"] / "adapter_model.safetensors").is_file()
    write_results(record, tmp_path / "gpu.json")
    write_section("residual_stream", {"residual_dtypes": record["residual_dtypes"]}, tmp_path / "gpu.json")
    write_results(record, tmp_path / "gpu.json")  # the top-level record rewritten keeps the section
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert not any(k.startswith("_") for k in saved) and saved["losses"] == record["losses"]
    assert saved["residual_stream"]["residual_dtypes"] == record["residual_dtypes"]


def bench_figure_names(path: Path) -> list[str]:
    """What bench/report.py would print for the GPU record at `path` (make bench-gpu)."""
    spec = importlib.util.spec_from_file_location("bench_figures", ROOT / "bench" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    return [f["name"] for f in figures.gpu(json.loads(path.read_text()))]


def test_cpu_rehearsal_padding_free_and_padded_batches_give_the_same_loss(tiny_dir, tmp_path):
    """Padding-free (SDPA over the block-diagonal mask on the CPU) and padded batches of the same rows:
    the same loss within the fp32 tolerance, and the section bench/report.py reads."""
    record = padding_comparison(tiny_dir, CPU_SMOKE, device="cpu")
    write_section("padding_free_vs_padded", record, tmp_path / "gpu.json")
    assert json.loads((tmp_path / "gpu.json").read_text())["padding_free_vs_padded"]["rows"] == 6
    assert record["padding_free"]["batch_shape"][0] == 1 and record["padded"]["batch_shape"][0] == 2
    assert record["loss_rel_diff"] <= LOSS_RTOL["float32"], record
    assert record["stage_trains_padding_free"] and not record["flash_attn_varlen"]  # CPU: attention_plan keeps it
    assert "padding-free (sdpa) vs padded batches: tokens/s" in bench_figure_names(tmp_path / "gpu.json")
    assert all(
        record[arm]["tokens_per_s"] > 0 and len(record[arm]["losses"]) == 3 for arm in ("padding_free", "padded")
    )


def test_cpu_rehearsal_bf16_export_check_passes_a_merge_and_fails_a_dropped_adapter(tiny_dir, tmp_path):
    """The export check in the GPU's dtype (bf16) on the CPU: a correct merge stays under the bf16
    tolerance, a dropped adapter fails."""
    from pipeline.errors import DistillError
    from pipeline.export.merged import DEFAULT_LOGPROB_TOLERANCE

    good = export_check(tiny_dir, tmp_path / "good", "cpu", "bfloat16", n_prompts=4)
    figures = export_record(good, tmp_path / "good")
    assert figures["compute"] == "bfloat16 on cpu"
    assert figures["max_logprob_delta"] < DEFAULT_LOGPROB_TOLERANCE["bfloat16"]
    with pytest.raises(DistillError, match=r"export: merged model"):
        export_check(tiny_dir, tmp_path / "dropped", "cpu", "bfloat16", drop_adapter=True, n_prompts=4)
    assert export_record(None, tmp_path / "dropped")["greedy_agreement"] < 0.75
    write_section("export_bf16", {"correct_merge": figures}, tmp_path / "gpu.json")
    assert any(n.startswith("export check in bf16") for n in bench_figure_names(tmp_path / "gpu.json"))


def test_cpu_rehearsal_nf4_trained_adapter_answers_alike_on_the_fp32_base(tiny_dir, tmp_path):
    """An adapter trained on the NF4 base to memorise 4 answers, greedy on NF4 and on the unquantized
    (fp32 here) base: both reproduce what it learned, above the stated floor."""
    overrides = CPU_SMOKE + ["train.max_steps=80", "train.lr=3e-3", "train.warmup_ratio=0", "train.lora.dropout=0"]
    qlora_run(tiny_dir, overrides, adapter_out=tmp_path / "adapter", rows=memorise_rows(tiny_dir, 4, 6), device="cpu")
    record = nf4_vs_bf16(tiny_dir, tmp_path / "adapter", overrides, n_prompts=4, max_new_tokens=8, device="cpu")
    print(record)
    assert record["unquantized_dtype"] == "float32" and record["prompts"] == 4
    assert_agreement_figures(record, NF4_VS_FP32_FLOOR)
    write_section("nf4_vs_bf16", record, tmp_path / "gpu.json")
    assert "NF4-trained adapter: greedy agreement, NF4 base vs bf16 base" in bench_figure_names(tmp_path / "gpu.json")
