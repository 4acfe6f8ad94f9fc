"""Evaluate's tuned student answers with its adapter merged into fp32 base weights: the answers
and their log-probs are the unmerged model's, no LoRA layer runs while it answers, and afterwards
the model is unmerged again, its base intact for the base student's answers.

    .venv/bin/pytest -q tests/evaluation/test_answering_merged.py
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Recipe
from pipeline.conversation import user_turn
from pipeline.task import Task

ROWS = [
    {"id": "a", "messages": user_turn("where is my order #1234?"), "completion": "track_order"},
    {"id": "b", "messages": user_turn("cancel my subscription please"), "completion": "cancel"},
]
TASK = Task(name="t", kind="classification", instructions="", labels=["track_order", "cancel", "refund"])


def adapted(tiny_llama_dir, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.llm.loading import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
    torch.manual_seed(1)  # B not zero: PEFT's default init would make merging a no-op
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval(), load_tokenizer(str(tiny_llama_dir))


def lora_calls(model) -> list[str]:
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


def recipe(decode: str) -> Recipe:
    return Recipe(name="t", model={"base": "x"}, eval={"max_new_tokens": 6}, router={"decode": decode})


def answers(model, tokenizer, decode: str):
    from pipeline.evaluation.answering import answer_all

    return answer_all(model, tokenizer, ROWS, recipe(decode), TASK, "tuned", "user").completions


@pytest.mark.parametrize("decode", ["generate", "label_posterior"])
def test_the_tuned_student_answers_merged_as_it_would_unmerged(tiny_llama_dir, decode):
    from pipeline.conversation import student_messages
    from pipeline.llm.answer import Serving, answer_as_served

    model, tokenizer = adapted(tiny_llama_dir, torch.float32)
    with torch.inference_mode():
        probe = torch.tensor([[1, 5, 9, 13]])
        with model.disable_adapter():
            base_logits = model(probe).logits
    convs = [student_messages(r["messages"], "user") for r in ROWS]
    unmerged = answer_as_served(model, tokenizer, convs, Serving.of(recipe(decode), TASK))
    calls = lora_calls(model)
    merged = answers(model, tokenizer, decode)
    assert calls == []  # the update was in the base weights; no LoRA layer ran
    for m, u in zip(merged, unmerged):
        assert m.text == u.text and m.token_ids == u.token_ids
        assert max(abs(a - b) for a, b in zip(m.token_logprobs, u.token_logprobs)) < 1e-5
        if decode == "label_posterior":
            assert max(abs(m.label_logprobs[k] - u.label_logprobs[k]) for k in TASK.labels) < 1e-5
    with torch.inference_mode():
        with model.disable_adapter():
            assert torch.allclose(model(probe).logits, base_logits, atol=1e-5)  # unmerged: the base again
        model(probe)
    assert calls  # and the adapter runs as LoRA layers again


def test_bf16_weights_are_left_unmerged(tiny_llama_dir):
    model, tokenizer = adapted(tiny_llama_dir, torch.bfloat16)
    calls = lora_calls(model)
    answers(model, tokenizer, "generate")
    assert calls


def test_a_peft_wrapper_is_given_its_models_name_for_the_kv_cache(tiny_llama_dir):
    """PEFT's forward takes **kwargs: the name comes from the transformers model inside, or a
    release that renamed `past_key_values` warns on every scoring pass."""
    import inspect

    from pipeline.llm.encoding import cache_kwarg

    model, _ = adapted(tiny_llama_dir, torch.float32)
    assert cache_kwarg(model) == cache_kwarg(model.get_base_model())
    assert cache_kwarg(model) in inspect.signature(model.get_base_model().forward).parameters
