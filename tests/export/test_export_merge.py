"""Merge equivalence: base + adapter and the merged folder, reloaded with plain transformers, give
the same greedy tokens and logits; the folder carries its dtype, chat template and EOS. The
export's own check (logits within a tolerance + greedy agreement, in the compute dtype on the
compute device) passes a correct merge and fails a wrong one.

    .venv/bin/pytest -q tests/export/test_export_merge.py
"""

import json
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import EXPORT_MERGED
from pipeline.conversation import user_turn
from pipeline.errors import DistillError
from pipeline.export.merged import base_dtype, export_merged, set_generation_eos

CONVS = [user_turn("where is my order #1234?"), user_turn("cancel my subscription")]


def random_adapter(model):
    """A LoRA whose B is not zero (PEFT's default init would make the merge a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ).eval()


def tiny_mistral(folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_merge(base_dir: Path, out: Path, max_new_tokens: int = 6) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapted = random_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    ids = tokenizer.apply_chat_template(CONVS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        expected = adapted(ids).logits
    result = export_merged(lambda: adapted, tokenizer, CONVS, max_new_tokens, out, base_dtype(str(base_dir)))
    merged = AutoModelForCausalLM.from_pretrained(out / EXPORT_MERGED, dtype=torch.float32).eval()
    with torch.no_grad():
        # fp32 summation order differs between W·x + B·A·x and (W + BA)·x: 1e-5 relative, logits ~20
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-3, rtol=1e-4)
    assert result.verified_prompts == 2 and all(a.token_ids for a in result.answers)
    files = {p.name for p in (out / EXPORT_MERGED).iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= files and not any("adapter" in f for f in files)
    assert merged.generation_config.eos_token_id == tokenizer.eos_token_id


def test_tiny_llama_merge_matches_base_plus_adapter(tiny_llama_dir, tmp_path):
    check_merge(tiny_llama_dir, tmp_path)


def test_tiny_mistral_merge_matches_base_plus_adapter(embedded_dir, tmp_path):
    check_merge(tiny_mistral(tmp_path / "mistral", embedded_dir), tmp_path / "out")


@pytest.mark.slow
def test_embedded_smollm2_merge_matches_base_plus_adapter(embedded_dir, tmp_path):
    check_merge(embedded_dir, tmp_path, max_new_tokens=3)


def test_merged_weights_are_saved_in_the_bases_dtype(tiny_llama_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    adapted = random_adapter(base)
    for module in adapted.modules():  # a zero adapter: the bf16 rounding of W + BA cannot flip a token
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.zeros_(b.weight)
    export_merged(lambda: adapted, tokenizer, CONVS[:1], 3, tmp_path, torch.bfloat16)
    with safe_open(tmp_path / EXPORT_MERGED / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_generation_config_eos_is_the_tokenizers_and_keeps_other_stops():
    from transformers import GenerationConfig

    class Tok:
        eos_token_id, pad_token_id, bos_token_id = 2, 2, 1

    gen = GenerationConfig(eos_token_id=[0, 7])
    set_generation_eos(gen, Tok())
    assert gen.eos_token_id == [2, 0, 7] and gen.pad_token_id == 2
    gen = GenerationConfig(eos_token_id=0)
    set_generation_eos(gen, Tok())
    assert gen.eos_token_id == [2, 0]
    gen = GenerationConfig()
    set_generation_eos(gen, Tok())
    assert gen.eos_token_id == 2


def test_merging_into_a_4bit_base_is_refused(tmp_path):
    class Quantized:
        is_loaded_in_4bit = True

    with pytest.raises(DistillError, match="refusing to merge into a quantized base"):
        export_merged(Quantized, None, CONVS, 3, tmp_path)


# ---------------------------------------------------------------- the export's own check


def wrong_merge(adapted, monkeypatch, damage):
    """Let the real merge run, then damage what it returns before export_merged saves it."""
    real = adapted.merge_and_unload

    def merge_and_unload():
        merged = real()
        with torch.no_grad():
            damage(merged)
        return merged

    monkeypatch.setattr(adapted, "merge_and_unload", merge_and_unload)


def tiny_adapted(base_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir), random_adapter(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    )


def test_a_correct_merge_passes_with_its_figures_recorded(tiny_llama_dir, tmp_path):
    import json

    tokenizer, adapted = tiny_adapted(tiny_llama_dir)
    result = export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path, base_dtype(str(tiny_llama_dir)))
    # fp32 weights and compute: only summation order differs, so the strict default bar applies
    assert result.logprob_tolerance == 1e-3
    assert 0 <= result.max_logprob_delta < 1e-4 and result.greedy_agreement == 1.0
    figures = json.loads((tmp_path / "verification.json").read_text())
    assert figures["mismatches"] == 0 and figures["compute"] == "float32 on cpu" and figures["saved_dtype"] == "float32"
    assert figures["max_logprob_delta"] == max(figures["logprob_deltas"]) == result.max_logprob_delta
    assert len(figures["logprob_deltas"]) == 2 and figures["logprob_tolerance"] == 1e-3


def test_one_wrong_weight_in_the_merged_model_fails_the_export(tiny_llama_dir, tmp_path, monkeypatch):
    tokenizer, adapted = tiny_adapted(tiny_llama_dir)

    def one_weight(merged):
        merged.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5

    wrong_merge(adapted, monkeypatch, one_weight)
    with pytest.raises(
        DistillError,
        match=r"log-probabilities differ from base\+adapter's by up to .* nats, over "
        r"export.verify_logprob_tolerance=0.001, on .*float32 on cpu",
    ):
        export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path, base_dtype(str(tiny_llama_dir)))
    figures = json.loads((tmp_path / "verification.json").read_text())
    assert figures["max_logprob_delta"] > 1e-3  # left behind for inspection


def test_the_check_runs_in_the_compute_dtype_and_a_dropped_adapter_fails_in_bf16(
    tiny_llama_dir, tmp_path, monkeypatch, caplog
):
    tokenizer, adapted = tiny_adapted(tiny_llama_dir, torch.bfloat16)
    result = export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path / "good", torch.bfloat16)
    assert next(result.model.parameters()).dtype == torch.bfloat16  # reloaded as base + adapter ran, not fp32
    assert result.logprob_tolerance == 2.0 and result.max_logprob_delta < 0.1 < 1.0 < result.adapter_logprob_effect
    assert json.loads((tmp_path / "good" / "verification.json").read_text())["compute"] == "bfloat16 on cpu"

    tokenizer, adapted = tiny_adapted(tiny_llama_dir, torch.bfloat16)
    monkeypatch.setattr(adapted, "merge_and_unload", adapted.unload)  # the LoRA removed instead of merged
    # This 2-layer random model's flat distributions move only ~1.4 nats without the adapter, under
    # the bf16 bar (said in a warning); greedy agreement is what fails it.
    with pytest.raises(DistillError, match=r"greedy answer on 0% of 2 .*bfloat16 on cpu"):
        export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path / "bad", torch.bfloat16)
    figures = json.loads((tmp_path / "bad" / "verification.json").read_text())
    assert figures["max_logprob_delta"] == pytest.approx(figures["adapter_logprob_effect"])  # merged == the base
    assert "cannot tell a dropped adapter from a correct merge" in caplog.text


def test_a_dropped_adapter_fails_the_logits_bar_in_fp32(tiny_llama_dir, tmp_path, monkeypatch):
    tokenizer, adapted = tiny_adapted(tiny_llama_dir)
    monkeypatch.setattr(adapted, "merge_and_unload", adapted.unload)
    with pytest.raises(DistillError, match=r"over export.verify_logprob_tolerance=0.001"):
        export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path, min_agreement=0.0)


def test_greedy_answers_below_the_agreement_bar_fail_the_export(tiny_llama_dir, tmp_path, monkeypatch):
    tokenizer, adapted = tiny_adapted(tiny_llama_dir)
    monkeypatch.setattr(adapted, "merge_and_unload", adapted.unload)
    with pytest.raises(
        DistillError,
        match=r"greedy answer on 0% of 2 verification prompts, under "
        r"export.verify_min_agreement=0.75",
    ):
        export_merged(lambda: adapted, tokenizer, CONVS, 6, tmp_path, logprob_tolerance=1e9)
