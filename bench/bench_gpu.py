"""The GPU tier as one short run: preflight, the small-model GPU tests, the mistral7b-shape QLoRA step
against the VRAM planner, and the export of a random-weight 7B under an A10G's memory.

    bash bench/gpu_run.sh                        (offline GPU node: venv from .gpu-wheelhouse, then this)
    .venv/bin/python bench/bench_gpu.py          (make bench-gpu, where the packages are installed)
    .venv/bin/python bench/bench_gpu.py --cpu-rehearsal --out /tmp/gpu.json     (the CPU part, tiny; in make test)

Steps, each timed, all into bench/results/gpu.json (envelope + figures, bench/harness.py):
1. preflight: torch and its CUDA build, the driver, the GPU and its memory, the packages, whether
   bitsandbytes' CUDA library loads, which varlen attention kernel loads, the free disk.
2. small-model GPU tier: `pytest -m gpu tests/gpu/test_gpu.py` less the 7B tests (residual stream in bf16,
   padding-free vs padded loss, the bf16 export check, NF4 vs bf16 agreement above its floor).
3. the mistral7b shape: a random-weight Mistral-7B (14.5 GB, kept in --work for step 4), 3 QLoRA
   steps of recipes/mistral7b.yaml's train section, the planner's estimate within 1.0-1.3x of the peak.
4. A10G emulation: torch.cuda.set_per_process_memory_fraction caps this process at --cap-gib (22.5 GiB,
   an A10G's usable memory), then export's merge check runs on that 7B in bf16 with a random LoRA
   (pipeline.export.merged.export_merged, as the export stage calls it); it must finish under the cap
   with one model copy at a time.

Without CUDA (and without --cpu-rehearsal) it says so and exits 0, writing nothing. --cpu-rehearsal
runs steps 1 and 4 at a tiny shape on the CPU (steps 2-3's CPU rehearsals are tests in make test).
Needs ~35 GB of free disk under --work on a GPU. Exit status: non-zero when a step failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT / "tests"))  # tests/support/random_mistral.py: the random models are shared
sys.path.insert(2, str(ROOT))
import harness  # noqa: E402

RAW = ROOT / "bench" / "gpu.json"  # where tests/gpu/test_gpu.py writes its record
A10G_GIB = 22.5
GIB = 1024**3
SMALL_TESTS = "not mistral7b and not vram_planner"
SEVEN_B_TESTS = "mistral7b or vram_planner"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_arguments(parser)
    parser.add_argument("--cpu-rehearsal", action="store_true", help="steps 1 and 4 at a tiny shape on the CPU")
    parser.add_argument("--cap-gib", type=float, default=A10G_GIB, help="GPU memory cap for step 4")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for the random 7B and its export (default: a temp folder, removed after)",
    )
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_rehearsal
    if not cuda and not args.cpu_rehearsal:
        from pipeline.llm.loading import cuda_diagnosis

        print(f"bench-gpu: no CUDA device ({cuda_diagnosis()}): skipped, nothing written (docs/gpu.md)")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"steps": {}}
    failed: list[str] = []
    try:
        timed(record, "preflight", lambda: record.update(preflight=preflight(work)))
        if cuda:
            for step, selection in (("small_model_tier", SMALL_TESTS), ("mistral7b_shape", SEVEN_B_TESTS)):
                code = timed(record, step, lambda selection=selection: gpu_tests(selection, work / "mistral7b-random"))
                record["steps"][step]["pytest_exit"] = code
                failed += [step] if code else []
            if RAW.is_file():
                record |= json.loads(RAW.read_text())
                RAW.unlink()
            model = work / "mistral7b-random"
        else:
            from support.random_mistral import TINY, write_random_model

            model = write_random_model(work / "tiny-random", TINY, "cpu")
        emulation = timed(record, "export_a10g", lambda: export_emulation(model, work / "export", cuda, args.cap_gib))
        record["export_a10g"] = emulation
        failed += [] if emulation["passed"] else ["export_a10g"]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    record["failed_steps"] = failed
    harness.write("gpu", record, args)
    for step, info in record["steps"].items():
        print(
            f"  {step}: {info['wall_s']:.0f} s"
            + (f" (pytest exit {info['pytest_exit']})" if "pytest_exit" in info else "")
        )
    if failed:
        print(f"bench-gpu: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def timed(record: dict, step: str, run):
    start = time.perf_counter()
    print(f"bench-gpu: {step} ...", flush=True)
    try:
        return run()
    finally:
        record["steps"].setdefault(step, {})["wall_s"] = round(time.perf_counter() - start, 1)


def preflight(work: Path) -> dict:
    """What this machine offers the GPU tier, each check in its own words (none raises)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from pipeline.llm.loading import nvidia_driver_version, varlen_attention

    out = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": nvidia_driver_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "free_disk_gb": round(shutil.disk_usage(work).free / 1e9, 1),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", ""),
        "python": sys.version.split()[0],
    }
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "kernels"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {
            "gpu": props.name,
            "gpu_total_gib": round(props.total_memory / GIB, 2),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.is_bf16_supported(),
        }
        out["bitsandbytes_cuda"] = _bitsandbytes_cuda()
        out["varlen_attention"], out["varlen_why"] = varlen_attention()
    print(json.dumps(out, indent=1))
    return out


def _bitsandbytes_cuda() -> str:
    """Quantize and dequantize on the GPU once: the native library loaded and its kernels run."""
    import torch

    try:
        import bitsandbytes.functional as F

        q, state = F.quantize_4bit(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        back = F.dequantize_4bit(q, state)
        return f"ok ({back.shape[0]}x{back.shape[1]} NF4 round trip)"
    except (ImportError, RuntimeError, OSError) as err:
        return f"failed: {type(err).__name__}: {str(err)[:200]}"


def gpu_tests(selection: str, model_dir: Path) -> int:
    """The GPU tests in a child process (its CUDA memory is its own), writing bench/gpu.json."""
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
        "DISTILL_GPU_MODEL_DIR": str(model_dir),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-s",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "-k",
            selection,
            "tests/gpu/test_gpu.py",
        ],
        cwd=ROOT,
        env=env,
    )


def export_emulation(model_dir: Path, out: Path, cuda: bool, cap_gib: float) -> dict:
    """Export's merge check on `model_dir` + a random LoRA on every projection, bf16 on the GPU under a
    memory cap of `cap_gib` (fp32 on the CPU, uncapped: the rehearsal). One model copy must be alive at
    the reload: the peak (GPU) or the live parameter bytes at the reload (CPU) against one copy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from support.random_mistral import prompts
    from transformers import AutoModelForCausalLM

    from pipeline.errors import DistillError
    from pipeline.export import merged as merged_export
    from pipeline.llm.loading import free_memory, load_tokenizer
    from pipeline.planner import load_architecture

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    arch = load_architecture(str(model_dir))
    one_copy = arch.params * dtype.itemsize / GIB
    record = {
        "model": str(model_dir.name),
        "params": arch.params,
        "device": device,
        "dtype": str(dtype)[6:],
        "one_copy_gib": round(one_copy, 3),
    }
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / total))
        torch.cuda.reset_peak_memory_stats()
        record |= {"cap_gib": cap_gib, "gpu_total_gib": round(total, 2)}
    alive_at_reload: list[float] = []
    real_reload = merged_export.reload_plain

    def reload_plain(*a, **k):  # what is alive once the merged folder is back (CPU: no allocator stats)
        model = real_reload(*a, **k)
        alive_at_reload.append(live_parameter_gib())
        return model

    def load_adapted():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device}).eval()
        torch.manual_seed(1)
        return get_peft_model(
            base,
            LoraConfig(
                r=16,
                lora_alpha=32,
                init_lora_weights=False,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        ).eval()

    merged_export.reload_plain = reload_plain
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        result = merged_export.export_merged(
            load_adapted, load_tokenizer(str(model_dir)), prompts(2, arch.vocab), 4, out, save_dtype=dtype
        )
        record |= {
            "check": "passed",
            "max_logprob_delta": result.max_logprob_delta,
            "logprob_tolerance": result.logprob_tolerance,
            "greedy_agreement": result.greedy_agreement,
        }
        del result
    except DistillError as err:  # the check itself failing is recorded; memory is what this step is for
        record |= {"check": f"failed: {err}"}
    except torch.OutOfMemoryError as err:
        record |= {"check": f"out of memory under the cap: {str(err)[:300]}"}
    finally:
        merged_export.reload_plain = real_reload
        free_memory()
    if cuda:
        record["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        record["peak_over_one_copy"] = round(record["peak_allocated_gib"] / one_copy, 3)
        torch.cuda.set_per_process_memory_fraction(1.0)
    if alive_at_reload:
        record["copies_alive_at_reload"] = round(alive_at_reload[0] / one_copy, 3)
    # Two copies were the defect: a bf16 7B is 13.5 GiB, two do not fit an A10G's 22.5.
    record["passed"] = (
        not record["check"].startswith("out of memory")
        and record.get("copies_alive_at_reload", 9) < 1.5
        and (not cuda or record["peak_allocated_gib"] <= cap_gib)
    )
    print(json.dumps(record, indent=1))
    gc.collect()
    return record


def live_parameter_gib() -> float:
    """Distinct storage behind every live Parameter (collector-tracked, reachable or not), in GiB."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and isinstance(obj, torch.nn.Parameter) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[(obj.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()) / GIB


if __name__ == "__main__":
    raise SystemExit(main())
