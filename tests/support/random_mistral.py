"""Random Mistral models of any shape with a word-level tokenizer of the same vocabulary, and rows
and prompts in that vocabulary: shared by the GPU tier (tests/gpu/test_gpu.py, bench/bench_gpu.py)
and the planner's CPU measurements."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT_TOKENS = 64
# The shape the CPU rehearsals train and export: seconds on a CPU.
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1024,
    tie_word_embeddings=False,
    head_dim=16,
)


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
    config = MistralConfig(
        **shape,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=1,
        eos_token_id=2,
    )
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


def prompts(n: int, vocab: int, length: int = 12, seed: int = 5) -> list[list[dict]]:
    """User turns of in-vocabulary words for the word-level tokenizer of write_random_model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen).tolist()
    return [[{"role": "user", "content": " ".join(f"t{i}" for i in row)}] for row in ids]
