"""GPU tier: a real QLoRA step at the full mistral7b shape, and the VRAM planner against the measured peak.

    make test-gpu        (needs CUDA and ~15 GB of free disk; a few minutes; writes bench/gpu.json)

`make test` deselects the `gpu` tests and they skip themselves without CUDA. The model is
Mistral-7B-Instruct-v0.3's exact shape (the planner's KNOWN_ARCHITECTURES entry) with random
bf16 weights, saved to a folder and loaded back by the project's own loader, so the path is
the finetune stage's: `device_plan` -> `load_model` (NF4 through `build_bnb_config`) ->
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
CPU in `make test` (the last test here), so it cannot rot unseen between GPU loans.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"
RESULTS = ROOT / "bench" / "gpu.json"
PROMPT_TOKENS = 64
SMOKE = ["train.max_steps=3", "train.grad_accum=1", "train.logging_steps=1", "train.eos_check='off'"]
# The CPU rehearsal: tiny rows, and a plain optimizer (paged 8-bit AdamW is CUDA-only).
CPU_SMOKE = SMOKE + ["train.max_seq_len=96", "train.batch_size=2", "train.optim=adamw_torch", "train.quant.on_cpu=run"]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1024, tie_word_embeddings=False, head_dim=16)

# Tolerance for the planner, against torch.cuda.max_memory_allocated() over the training steps.
# The estimate's CUDA-context share (planner.CUDA_CONTEXT_GIB) is not a tensor, so it is taken
# off before comparing. Lower bound 1.0: `check_fits` passes or refuses a recipe on this number,
# and an underestimate is the OOM an hour into a run that the planner exists to prevent. Upper
# bound 1.5: the planner is pessimistic on purpose (10% for allocator fragmentation; full-vocab
# bf16 logits + fp32 copy + grad, 2.5 GiB at this shape, where TRL 1.x scores in tiles) and those
# allowances alone reach ~1.4x here; past 1.5x it would turn away recipes that fit easily.
LOW, HIGH = 1.0, 1.5
WEIGHTS_TOLERANCE = 0.10  # the NF4 layout is plain arithmetic; 10% covers quant-state bookkeeping


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU: run `make test-gpu` on a machine with one")


# ---------------------------------------------------------------- harness (shared with the CPU rehearsal)


def write_random_model(folder: Path, shape: dict, device: str) -> Path:
    """A MistralForCausalLM of `shape` with random bf16 weights, plus a word-level tokenizer of the same vocab."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # v0.3's own settings beside the shape: no sliding window (a padding-free batch is one long row).
    config = MistralConfig(**shape, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast: 7B normal_() on a GPU takes a second
        model = MistralForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(partial, max_shard_size="5GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), shape["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = (ROOT / "recipes" / "templates" / "mistral-v0.3.jinja").read_text()
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def random_rows(n: int, seq_len: int, vocab: int, seed: int = 0):
    """Pre-tokenized rows as the stage's tokenize_dataset returns them: a 64-token prompt, the rest answer."""
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=gen).tolist()
    prompt = min(PROMPT_TOKENS, seq_len // 2)
    mask = [0] * prompt + [1] * (seq_len - prompt)
    return Dataset.from_dict({"input_ids": ids, "completion_mask": [mask] * n})


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


def qlora_run(folder: Path, overrides: list[str]) -> dict:
    """Train like the finetune stage for max_steps on random rows; return what happened and what it cost."""
    import torch
    from trl import SFTTrainer

    from pipeline.config import load_recipe
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer
    from pipeline.planner import CUDA_CONTEXT_GIB, GIB, estimate, load_architecture
    from pipeline.stages.finetune import build_lora_config, build_sft_config

    cfg = load_recipe("mistral7b", root=ROOT, overrides=overrides).train  # the model is `folder`
    plan = device_plan(want_4bit=cfg.quant.load_in_4bit, allow_cpu_4bit=cfg.quant.on_cpu == "run")
    cuda = plan.device == "cuda"
    arch = load_architecture(str(folder))
    est = estimate(arch, cfg, plan.dtype_name)
    tokenizer = load_tokenizer(str(folder))
    rows = random_rows(cfg.max_steps * cfg.batch_size * cfg.grad_accum, cfg.max_seq_len, arch.vocab)

    alloc = (lambda: torch.cuda.memory_allocated() / GIB) if cuda else (lambda: 0.0)  # CPU: not measured
    before_load = alloc()
    start = time.perf_counter()
    model = load_model(str(folder), plan, cfg.quant)
    weights = alloc() - before_load  # as the stage does: no k-bit preparation (it would upcast to fp32)
    load_s = time.perf_counter() - start

    args = build_sft_config(cfg, folder.parent / f"{folder.name}-checkpoints", plan)
    args.save_strategy, args.disable_tqdm = "no", True
    timer = step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=build_lora_config(cfg.lora), callbacks=[timer])
    types = {n: type(p).__name__ for n, p in trainer.model.named_parameters()}
    begin = snapshot(trainer.model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
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
        "arch": asdict(arch), "params": arch.params,
        "train": {k: getattr(cfg, k) for k in ("max_seq_len", "batch_size", "grad_accum", "max_steps", "optim",
                                                "gradient_checkpointing", "padding_free", "packing")}
        | {"lora_r": cfg.lora.r, "compute_dtype": plan.dtype_name, "tokens_per_step": tokens},
        "estimate_gib": est.parts() | {"total": est.total, "comparable_to_allocated": est_alloc},
        "measured_gib": {"weights_after_load": weights,
                         "peak_allocated": peak, "peak_reserved": reserved} if cuda else None,
        "estimate_over_measured": est_alloc / peak if cuda else None,
        "band": [LOW, HIGH],
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "step_s": [b - a for a, b in zip([start, *timer.ends], timer.ends)],
        "tokens_per_s": tokens * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "load_s": load_s, "train_s": train_s,
        # for the assertions; dropped from the JSON
        "_types": types, "_lora": lora, "_frozen": frozen, "_frozen_moved": frozen_moved, "_lora_moved": lora_moved,
        "_lora_b_zero_at_start": all(begin[n].abs().sum() == 0 for n in lora if "lora_B" in n),
    }


def _versions() -> dict:
    from importlib.metadata import version

    import torch

    out = {name: version(name) for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")}
    return out | {"cuda": torch.version.cuda}


def write_results(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in record.items() if not k.startswith("_")}
    path.write_text(json.dumps(public, indent=2, default=str) + "\n")


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
    record = qlora_run(mistral7b_dir, SMOKE)
    write_results(record, RESULTS)  # before any assertion: a failing run's numbers are the interesting ones
    print(json.dumps({k: record[k] for k in ("gpu", "estimate_gib", "measured_gib", "estimate_over_measured",
                                             "losses", "tokens_per_s")}, indent=1, default=str))
    return record


@gpu
@needs_cuda
def test_qlora_steps_on_the_full_mistral7b_shape_train_lora_only(mistral7b_dir, mistral7b_run):
    from pipeline.planner import Architecture, KNOWN_ARCHITECTURES, load_architecture

    assert load_architecture(str(mistral7b_dir)) == Architecture.from_config(KNOWN_ARCHITECTURES[MISTRAL])
    assert mistral7b_run["params"] == pytest.approx(7.25e9, rel=0.01)
    assert mistral7b_run["measured_gib"] is not None, f"trained on {mistral7b_run['device']}, not CUDA"
    assert_trained_lora_only(mistral7b_run)


@gpu
@needs_cuda
def test_vram_planner_estimate_brackets_the_measured_peak(mistral7b_run):
    est, measured = mistral7b_run["estimate_gib"], mistral7b_run["measured_gib"]
    weights = measured["weights_after_load"]
    assert abs(weights - est["weights"]) <= WEIGHTS_TOLERANCE * est["weights"], \
        f"NF4 base + bf16 embeddings measured {weights:.2f} GiB, planned {est['weights']:.2f} GiB"
    peak, planned = measured["peak_allocated"], est["comparable_to_allocated"]
    assert LOW * peak <= planned <= HIGH * peak, (
        f"planner {planned:.2f} GiB (+{est['total'] - planned:.1f} GiB CUDA context = {est['total']:.2f}) vs measured "
        f"peak {peak:.2f} GiB allocated: ratio {planned / peak:.2f}, outside [{LOW}, {HIGH}]; parts {est}; see {RESULTS}")


# ---------------------------------------------------------------- the same harness on the CPU (in make test)


def test_gpu_harness_rehearses_on_a_tiny_shape_on_cpu(tmp_path):
    """What the GPU tests run, at hidden 64 on the CPU's bitsandbytes NF4: keeps the harness honest."""
    from pipeline.planner import Architecture, load_architecture

    folder = write_random_model(tmp_path / "tiny", TINY, "cpu")
    assert write_random_model(folder, TINY, "cpu") == folder  # reused, not rewritten
    assert load_architecture(str(folder)) == Architecture.from_config(TINY)
    record = qlora_run(folder, CPU_SMOKE)
    assert_trained_lora_only(record)
    assert record["train"]["tokens_per_step"] == 2 * 96 and record["estimate_gib"]["total"] > 0
    write_results(record, tmp_path / "gpu.json")
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert not any(k.startswith("_") for k in saved) and saved["losses"] == record["losses"]
