"""The `gguf` export: llama.cpp files of every `export.gguf_types` entry, made from the merged folder.

    distill export RECIPE export.formats=[merged,gguf]

F16 (and f32/bf16 when asked) come from llama.cpp's own converter (converter.py); every other
type is quantized from the F16 file by llama.cpp's quantizer through llama-cpp-python. Each
file is then described from its own tensors: real bits per weight and which tensor types it
holds, because a small model's "Q4_K_M" is often mostly legacy Q5_0/Q8_0 (k-quants need rows
that are multiples of 256; SmolLM2's hidden size is 576).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import EXPORT_GGUF, gguf_name
from pipeline.errors import DistillError
from pipeline.gguf_types import CONVERTED, QUANTIZED, REFERENCE_TYPE


@dataclass(frozen=True)
class GgufFile:
    type: str
    path: Path
    size_bytes: int
    params: int
    tensor_types: dict[str, int]  # ggml type name -> tensor count

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / max(self.params, 1)


def export_gguf(merged: Path, types: list[str], out: Path, cache: Path) -> list[GgufFile]:
    """Write `out/gguf/model-<type>.gguf` for each type (f16 first: the others come from it)."""
    from pipeline.export.converter import convert

    folder = out / EXPORT_GGUF
    folder.mkdir(parents=True, exist_ok=True)
    ordered = [REFERENCE_TYPE] + [t for t in types if t != REFERENCE_TYPE]
    for gguf_type in ordered:
        target = folder / gguf_name(gguf_type)
        if gguf_type in CONVERTED:
            convert(merged, target, gguf_type, cache)
        else:
            quantize(folder / gguf_name(REFERENCE_TYPE), target, gguf_type)
    return [describe(folder / gguf_name(t), t) for t in ordered]


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer; it reports failure as a return code, never an exception."""
    import os

    import llama_cpp

    from pipeline.llm.gguf_runtime import quiet_llama_cpp

    quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[gguf_type]
    params.nthread = os.cpu_count() or 1
    tmp = target.with_name(f".{target.name}.tmp")
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise DistillError(f"export: llama.cpp could not quantize {source.name} to {gguf_type} (return code {code})")
    os.replace(tmp, target)


def describe(path: Path, gguf_type: str) -> GgufFile:
    """Size, weight count and tensor-type histogram, read from the file's own tensor table."""
    from gguf import GGMLQuantizationType

    tensors = tensor_table(path)
    counts = Counter(GGMLQuantizationType(t).name.lower() for _, t in tensors)
    return GgufFile(gguf_type, path, path.stat().st_size, sum(n for n, _ in tensors), dict(counts))


# GGUF value types -> fixed size in bytes (8: string, 9: array are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def tensor_table(path: Path) -> list[tuple[int, int]]:
    """(elements, ggml type) per tensor. gguf.GGUFReader would parse every metadata array into
    one numpy view per element (about 100k for a 49k vocab: seconds per file); this walks the
    header and skips the values (GGUF v3 layout: magic, version, counts, key/values, tensor infos)."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise DistillError(f"{path}: not a GGUF file")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24

        def skip_value(kind: int, pos: int) -> int:
            if kind in _FIXED:
                return pos + _FIXED[kind]
            if kind == 8:
                return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _FIXED:
                return pos + count * _FIXED[item]
            for _ in range(count):
                pos = skip_value(item, pos)
            return pos

        for _ in range(n_kv):
            pos = skip_value(8, pos)  # the key
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos = skip_value(kind, pos + 4)
        tensors = []
        for _ in range(n_tensors):
            pos = skip_value(8, pos)  # the name
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, _offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            elements = 1
            for d in dims:
                elements *= d
            tensors.append((elements, kind))
    return tensors


def gguf_metadata(llm) -> dict:
    """The tokenizer fields a broken conversion gets wrong, as llama.cpp itself read them from
    the file (llama-cpp-python's `Llama.metadata`: every value a string)."""
    meta = llm.metadata

    def as_int(key: str) -> int | None:
        return int(meta[key]) if key in meta else None

    return {
        "tokenizer.ggml.bos_token_id": as_int("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": as_int("tokenizer.ggml.eos_token_id"),
        "tokenizer.ggml.add_bos_token": meta.get("tokenizer.ggml.add_bos_token") == "true",
        "tokenizer.chat_template": meta.get("tokenizer.chat_template"),
        "tokenizer.ggml.pre": meta.get("tokenizer.ggml.pre"),
    }
