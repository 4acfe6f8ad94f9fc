"""VRAM planner: estimate a recipe's peak GPU memory from the model config alone.

    distill plan RECIPE            (estimate on A10G 24 GB, A100 40 GB, A100 80 GB; no GPU needed)

The finetune stage calls `check_fits` on CUDA before loading anything, so a recipe that
cannot fit fails in a second with the numbers and what to change, not after a 15 GB
download and an OOM. The estimate is deliberately simple and a little pessimistic:

- weights: 4-bit linears cost 0.5 byte/param plus the quantization constants (fp32 absmax
  per 64-weight block = 0.5 bit/param; with double quantization 8-bit absmax + fp32 per 256
  blocks = 0.127 bit/param, QLoRA paper section 3). Embeddings, lm_head and norms are not
  quantized and stay in the compute dtype (finetune does not upcast them to fp32).
- LoRA: r*(in+out) params per adapted linear. On a 4-bit base TRL casts them to bf16 (weight +
  grad 2+2 bytes); on a bf16 base PEFT keeps them fp32 (4+4). AdamW states 8 bytes/param, 2 for 8-bit.
- activations, per token, in compute-dtype elements (ACTIVATION_COEFFICIENTS), measured on CPU
  with torch's memory profiler over the backbone's forward + backward in bf16 autocast, LoRA
  r=16 with dropout on all seven linears, non-reentrant checkpointing (tests/finetune/test_planner.py
  re-measures it): with checkpointing, each layer's input (1 x hidden per layer) plus the one
  layer recomputed in backward with its gradients in flight: 21.2 x hidden + 8 x intermediate
  on a 4-bit base (bf16 LoRA), 30.6 x hidden + 11 x intermediate on a bf16 base (fp32 LoRA:
  PEFT casts each linear's input up for the adapter, so its dropout copies are fp32). Plus
  2 x (q - kv) width where GQA keys/values are repeated to full heads (SDPA with a padding
  mask). Without checkpointing every layer keeps that much (a little pessimistic: the
  in-flight gradients are counted per layer). Memory-efficient attention: no seq^2 term.
- logits: TRL's fused LM head (trl/kernels/chunked_logprob.py) never materializes the
  (tokens, vocab) logits: one (<=4096 tokens, <=32768 vocab) tile in the compute dtype, the
  scored hidden states (a copy), their fp32 gradient and the final norm's fp32 input. An older
  TRL without it computes full logits + an fp32 copy + its gradient (10 bytes/token/vocab), and so
  does the finetune stage's answer-only loss (llm/trainer.py) for label smoothing or soft targets,
  counted as if every token were an answer token.
- overhead: CUDA context and cuBLAS workspaces (~0.8 GiB, not in max_memory_allocated) and
  10% for allocator fragmentation.

For mistral7b at 4 x 2048 this gives ~11.9 GiB. An earlier version said 12.9 with 2.5 GiB of
full-vocab logits and ~18h+6i activations; with peft.prepare_model_for_kbit_training the
residual stream ran fp32 and checkpoints + recomputed layer doubled (~15-17 GiB, issue 17);
finetune no longer calls it (tests/finetune/test_finetune.py checks the dtypes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DistillError

GIB = 1024**3

# Totals as the driver reports them (nvidia-smi MiB), what torch sees as total_memory.
GPUS: dict[str, float] = {
    "A10G 24 GB": 23028 / 1024,
    "A100 40 GB": 40960 / 1024,
    "A100 80 GB": 81920 / 1024,
}

# The hub is out of reach in tests and on air-gapped boxes: the few config.json fields the
# planner needs, copied from the published configs of the recipes' bases.
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
        tie_word_embeddings=False,
        head_dim=128,
    ),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        head_dim=64,
    ),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        head_dim=128,
    ),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
        attention_bias=True,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        head_dim=64,
    ),
}
KNOWN_ARCHITECTURES["embedded:smollm2-135m-instruct"] = KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT_GIB = 0.8
FRAGMENTATION = 1.10
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per token, in compute-dtype elements: (x hidden, x intermediate) of the layer recomputed in
# backward with its gradients in flight, by whether the base is 4-bit (see the docstring).
ACTIVATION_COEFFICIENTS = {True: (21.2, 8.0), False: (30.6, 11.0)}
# TRL's fused LM head tile: tokens x vocab per projection (trl/kernels/chunked_logprob.py).
LM_HEAD_TILE = (4096, 32768)


@dataclass(frozen=True)
class Architecture:
    """The decoder-only transformer shape the estimate needs (LLaMA/Mistral/Qwen2 family)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int
    attention_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> Architecture:
        try:
            hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
            return cls(
                hidden=hidden,
                layers=cfg["num_hidden_layers"],
                heads=heads,
                kv_heads=cfg.get("num_key_value_heads") or heads,
                intermediate=cfg["intermediate_size"],
                vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=cfg.get("head_dim") or hidden // heads,
                attention_bias=bool(cfg.get("attention_bias", False)),
            )
        except KeyError as err:
            raise DistillError(
                f"model config lacks {err.args[0]}: the planner needs a LLaMA-style config.json"
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head, norms, biases: the parameters bitsandbytes leaves unquantized."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = self.layers * 2 * self.hidden + self.hidden
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        return embed + norms + bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


@dataclass(frozen=True)
class Estimate:
    """Peak GPU memory, by part, in GiB."""

    weights: float
    lora: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    tokens_per_step: int

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.optimizer + self.activations + self.logits + self.overhead

    def parts(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "lora+grads": self.lora,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "overhead": self.overhead,
        }


def load_architecture(base: str, architecture: str | None = None) -> Architecture:
    """config.json from a local folder (or the converted embedded model), else the built-in table."""
    key = architecture or base
    folder = Path(base).expanduser()
    if not architecture and (folder / "config.json").is_file():
        return Architecture.from_config(json.loads((folder / "config.json").read_text()))
    if key in KNOWN_ARCHITECTURES:
        return Architecture.from_config(KNOWN_ARCHITECTURES[key])
    known = ", ".join(KNOWN_ARCHITECTURES)
    raise DistillError(
        f"planner: no config.json for '{key}'; use a local model folder or set model.architecture to one of: {known}"
    )


def lora_params(arch: Architecture, r: int, targets) -> int:
    names = LINEAR_NAMES if targets == "all-linear" else [t for t in targets if t in LINEAR_NAMES]
    shapes = arch.linears()
    return arch.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def estimate(arch: Architecture, train, compute_dtype: str = "bfloat16") -> Estimate:
    """Peak memory of one training step; `train` is our TrainConfig (read, never mutated)."""
    act_bytes = DTYPE_BYTES[compute_dtype]
    if train.quant.load_in_4bit:
        bits = 0.5 + (0.127 if train.quant.double_quant else 0.5) / 8
        weights = arch.linear_params * bits + arch.other_params * act_bytes
    else:
        weights = arch.params * act_bytes
    n_lora = lora_params(arch, train.lora.r, train.lora.targets)
    quantized = train.quant.load_in_4bit
    lora = n_lora * 2 * (act_bytes if quantized else 4)  # weight + grad: bf16 on a 4-bit base, else fp32
    optim_bytes = 2 if "8bit" in train.optim else 8
    optimizer = n_lora * optim_bytes
    tokens = train.batch_size * train.max_seq_len  # padding-free / packing / padded: at most this many
    per_token_hidden, per_token_inter = ACTIVATION_COEFFICIENTS[quantized]
    repeated_kv = 2 * (arch.heads - arch.kv_heads) * arch.head_dim
    per_layer = (
        tokens * (per_token_hidden * arch.hidden + per_token_inter * arch.intermediate + repeated_kv) * act_bytes
    )
    if train.gradient_checkpointing:
        activations = arch.layers * tokens * arch.hidden * act_bytes + per_layer
    else:
        activations = arch.layers * per_layer
    # Label smoothing and soft targets take the answer-only loss (llm/trainer.py): the answer positions'
    # full logits, at most every token's.
    if tiled_lm_head() and not train.label_smoothing and not train.soft_labels:
        tile = min(tokens, LM_HEAD_TILE[0]) * min(arch.vocab, LM_HEAD_TILE[1]) * act_bytes
        logits = tile + tokens * arch.hidden * (act_bytes + 4 + 4)
    else:
        logits = tokens * arch.vocab * (act_bytes + 4 + 4)
    subtotal = (weights + lora + optimizer + activations + logits) / GIB
    overhead = CUDA_CONTEXT_GIB + subtotal * (FRAGMENTATION - 1)
    return Estimate(weights / GIB, lora / GIB, optimizer / GIB, activations / GIB, logits / GIB, overhead, tokens)


def tiled_lm_head() -> bool:
    """Whether the installed TRL scores the loss through its fused LM head (found, not imported:
    importing TRL pulls in torch, seconds `distill plan` should not spend)."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    return bool(
        spec
        and spec.submodule_search_locations
        and any((Path(p) / "kernels" / "chunked_logprob.py").is_file() for p in spec.submodule_search_locations)
    )


def advice(arch: Architecture, train, budget_gib: float, compute_dtype: str = "bfloat16") -> list[str]:
    """Changes that would make the recipe fit, each checked against the estimate."""
    tips = []
    candidates: list[tuple[str, dict[str, object]]] = []  # (advice, the train update that applies it)
    if not train.gradient_checkpointing:
        candidates.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if not train.quant.load_in_4bit:
        candidates.append(
            (
                "train.method=qlora train.quant.load_in_4bit=true",
                {"method": "qlora", "quant": train.quant.model_copy(update={"load_in_4bit": True})},
            )
        )
    if train.batch_size > 1:
        half = max(1, train.batch_size // 2)
        candidates.append(
            (
                f"train.batch_size={half} train.grad_accum={train.grad_accum * train.batch_size // half}",
                {"batch_size": half, "grad_accum": train.grad_accum * train.batch_size // half},
            )
        )
    if train.max_seq_len > 512:
        candidates.append((f"train.max_seq_len={train.max_seq_len // 2}", {"max_seq_len": train.max_seq_len // 2}))
    for text, update in candidates:
        new = estimate(arch, train.model_copy(update=update), compute_dtype).total
        tips.append(f"{text} -> {new:.1f} GiB" + (" (fits)" if new <= budget_gib else ""))
    return tips


def format_estimate(est: Estimate) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.parts().items())
    return f"{est.total:.1f} GiB ({parts}; {est.tokens_per_step} tokens/micro-batch)"


def plan_table(arch: Architecture, train, name: str) -> str:
    """What `distill plan` prints: the estimate and whether it fits each reference GPU."""
    est = estimate(arch, train)
    lines = [
        f"{name}: {arch.params / 1e9:.2f}B params, {lora_params(arch, train.lora.r, train.lora.targets) / 1e6:.1f}M LoRA, "
        f"{'NF4' if train.quant.load_in_4bit else 'bf16'} base, seq {train.max_seq_len} x batch {train.batch_size}, "
        f"checkpointing {'on' if train.gradient_checkpointing else 'off'}",
        f"estimated peak: {format_estimate(est)}",
    ]
    for gpu, total in GPUS.items():
        verdict = "fits" if est.total <= total else "does NOT fit"
        lines.append(f"  {gpu:<11} {total:5.1f} GiB: {verdict} ({total - est.total:+.1f} GiB)")
        if est.total > total:
            lines += [f"      try: {tip}" for tip in advice(arch, train, total)]
    return "\n".join(lines)


def check_fits(arch: Architecture, train, gpu_name: str, total_gib: float, compute_dtype: str) -> Estimate:
    """Raise DistillError naming the numbers and the changes when the estimate exceeds the GPU."""
    est = estimate(arch, train, compute_dtype)
    if est.total > total_gib:
        tips = "; ".join(advice(arch, train, total_gib, compute_dtype)) or "a larger GPU"
        raise DistillError(
            f"finetune: estimated peak {format_estimate(est)} exceeds {gpu_name} ({total_gib:.1f} GiB). "
            f"Change: {tips}. (train.vram_check=warn trains anyway.)"
        )
    return est
