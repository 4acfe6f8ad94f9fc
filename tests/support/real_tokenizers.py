"""The real Mistral v0.3 and Llama 3 tokenizers, built offline from files on PyPI (the hub is off).

Llama 3: llama.cpp's vocab-only GGUF of Meta's tokenizer (models/ggml-vocab-llama-bpe.gguf) and the
reference token ids llama.cpp generated for it from the hub's tokenizer.json (.inp/.out), out of
the llama-cpp-python sdist the export stage already pins and fetches (pipeline/export/converter.py).
transformers reads the GGUF; the one setting GGUF does not carry, BPE `ignore_merges` (true in
Meta's tokenizer.json), is set back, which the reference ids check.

Mistral v0.3: the sentencepiece model mistral-common ships as its v3 tokenizer
(data/mistral_instruct_tokenizer_240323.model.v3, the 32768-token vocabulary of
Mistral-7B-Instruct-v0.3), taken from its wheel: installing mistral-common would pin numpy<2.4.

Both files are fetched by `make setup` into DISTILL_CACHE/downloads/ (the tests themselves never
touch the network) and checked here against PyPI's sha256. Each tokenizer is built once into
DISTILL_CACHE/tokenizers/ and loaded from there (~2 s; the first GGUF read takes ~30 s).
"""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from pipeline.artifacts import atomic_dir, sha256_file
from pipeline.export import converter
from pipeline.llm.loading import cache_root

MISTRAL_COMMON = ("1.13.1", "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af")
MISTRAL_MODEL = "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"
LLAMA3_VOCAB = "ggml-vocab-llama-bpe.gguf"


def mistral_v03_dir() -> Path:
    """Folder with tokenizer.json (+ the sentencepiece tokenizer.model it was built from)."""
    version, digest = MISTRAL_COMMON
    target = cache_root() / "tokenizers" / f"mistral-v0.3-mistral-common-{version}"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    with atomic_dir(target) as tmp:
        wheel = downloaded(f"mistral_common-{version}-py3-none-any.whl")
        if sha256_file(wheel) != digest:
            raise RuntimeError(f"{wheel.name}: sha256 is not PyPI's {digest}")
        with zipfile.ZipFile(wheel) as zf:
            (tmp / "tokenizer.model").write_bytes(zf.read(MISTRAL_MODEL))
        # As Mistral-7B-Instruct-v0.3's tokenizer_config.json: BOS added, no EOS, no pad token.
        (tmp / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
            ' "add_bos_token": true, "add_eos_token": false, "legacy": false}'
        )
        AutoTokenizer.from_pretrained(tmp).save_pretrained(tmp)
    return target


def llama3_dir() -> Path:
    """Folder with tokenizer.json, plus llama.cpp's reference strings (`.inp`) and ids (`.out`)."""
    version = converter.LLAMA_CPP_VERSION
    target = cache_root() / "tokenizers" / f"llama3-llama.cpp-{version}"
    if (target / "tokenizer.json").is_file():
        return target
    from tokenizers import processors
    from transformers import AutoTokenizer

    members = [f"models/{LLAMA3_VOCAB}{suffix}" for suffix in ("", ".inp", ".out")]
    with atomic_dir(target) as tmp:
        downloaded(f"llama_cpp_python-{version}.tar.gz")
        sdist = converter.llama_cpp_sdist(cache_root(), version)  # checks the pinned sha256
        with tarfile.open(sdist) as tar:
            for member in members:
                src = tar.extractfile(f"llama_cpp_python-{version}/vendor/llama.cpp/{member}")
                (tmp / Path(member).name).write_bytes(src.read())
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=LLAMA3_VOCAB)
        tok.backend_tokenizer.model.ignore_merges = True
        bos = tok.bos_token  # <|begin_of_text|>, added in front as Meta's post-processor does
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.bos_token_id)]
        )
        tok.eos_token = "<|eot_id|>"  # the instruct models' end of turn, as their tokenizer_config.json
        tok.save_pretrained(tmp)
        (tmp / LLAMA3_VOCAB).unlink()
    return target


def downloaded(name: str) -> Path:
    """A file `make setup` put in DISTILL_CACHE/downloads/."""
    path = cache_root() / "downloads" / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: `make setup` downloads it (the tests do not touch the network)")
    return path
