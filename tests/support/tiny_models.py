"""Tiny random decoders with the embedded model's tokenizer: real architectures, seconds to build."""

from pathlib import Path


def tiny_shape(tokenizer, **overrides) -> dict:
    """Config fields of a 2-layer decoder over `tokenizer`'s vocabulary (any Llama-like config class)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }


def save_tiny_llama(out: Path, tokenizer, seed: int = 0, dtype=None, **overrides) -> Path:
    """A random Llama of `tiny_shape` saved to `out` (weights seeded: the same seed, the same model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**tiny_shape(tokenizer, **{"tie_word_embeddings": True, **overrides}))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return out
