"""Completion-only loss: the labels that reach the loss are the answer and its end-of-turn token, nothing else.

Three real template families, offline: SmolLM2's own ChatML, and the shipped Mistral v0.3 and
Llama 3 templates on the embedded tokenizer with their special tokens added.
"""

from pathlib import Path

import pytest

from pipeline.config import LoraConfig, TrainConfig
from pipeline.errors import DistillError
from pipeline.llm.loading import DevicePlan
from pipeline.stages import finetune

ROOT = Path(__file__).resolve().parents[1]
CPU = DevicePlan("cpu", "float32", False, "test")
ROWS = [
    {"prompt": "my card never arrived", "completion": "card_arrival"},
    {"prompt": "how do I top up by bank transfer? it has been pending for days", "completion": "pending top up"},
    {"prompt": "refund", "completion": "Request a refund, please."},
]


def _with_template(embedded_dir, template: str, bos: str, eos: str, extra: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": extra})
    tok.chat_template = (ROOT / "recipes" / "templates" / template).read_text()
    return tok


@pytest.fixture(scope="module")
def tokenizers(embedded_dir):
    from transformers import AutoTokenizer

    return {
        # ChatML; its eos (<|im_end|>) is also its pad token, the case that hides EOS from the loss elsewhere.
        "smollm2": (AutoTokenizer.from_pretrained(embedded_dir), "{answer}<|im_end|>"),
        "mistral": (_with_template(embedded_dir, "mistral-v0.3.jinja", "<s>", "</s>", ["[INST]", "[/INST]"]),
                    " {answer}</s>"),
        "llama3": (_with_template(embedded_dir, "llama3.jinja", "<|begin_of_text|>", "<|eot_id|>",
                                  ["<|start_header_id|>", "<|end_header_id|>"]), "{answer}<|eot_id|>"),
    }


def _prepared(tokenizer, rows, tmp_path, system: str | None = None):
    """What SFTTrainer will feed the model: our tokenization, then TRL's labels."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer

    pairs = finetune.to_prompt_completion(Dataset.from_list(rows))
    if system:
        pairs = pairs.map(lambda ex: {"prompt": [{"role": "system", "content": system}, *ex["prompt"]]})
    train = finetune.tokenize_dataset(pairs, tokenizer, max_len=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = SFTTrainer(model=model, args=finetune.build_sft_config(TrainConfig(max_steps=1), tmp_path, CPU),
                         train_dataset=train, processing_class=tokenizer,
                         peft_config=finetune.build_lora_config(LoraConfig(r=2, alpha=4)))
    return trainer


@pytest.mark.parametrize("family", ["smollm2", "mistral", "llama3"])
@pytest.mark.parametrize("system", [None, "Classify the banking request."])
def test_labels_are_exactly_the_answer_and_its_eos(family, system, tokenizers, tmp_path):
    tokenizer, answer_format = tokenizers[family]
    trainer = _prepared(tokenizer, ROWS, tmp_path, system)
    for row, ex in zip(ROWS, trainer.train_dataset):
        ids, labels = ex["input_ids"], ex["labels"]
        trained = [t for t in labels if t != -100]
        expected = tokenizer(answer_format.format(answer=row["completion"]), add_special_tokens=False)["input_ids"]
        assert trained == expected, tokenizer.decode(trained)
        assert trained[-1] == tokenizer.eos_token_id
        # The trained tokens are the tail of the sequence; everything before them is the prompt as inference renders it.
        n = len(trained)
        assert labels[-n:] == ids[-n:] and all(t == -100 for t in labels[:-n])
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(ids[:-n]) == prompt


def test_collated_batch_keeps_eos_in_the_labels_when_pad_is_eos(tokenizers, tmp_path):
    import torch

    tokenizer, _ = tokenizers["smollm2"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    trainer = _prepared(tokenizer, ROWS, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    eos_labels = (batch["labels"] == tokenizer.eos_token_id).sum(dim=1)
    assert torch.equal(eos_labels, torch.ones(len(ROWS), dtype=torch.long))


def test_template_that_never_closes_the_turn_is_refused(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant:{% endif %}"
    with pytest.raises(DistillError, match="does not end the assistant turn with the EOS token"):
        finetune.tokenize_prompt_completion(tok, [{"role": "user", "content": "hi"}],
                                            [{"role": "assistant", "content": "card_arrival"}], 64)


def test_template_that_moves_the_prompt_is_refused(embedded_dir):
    """The published Mistral v0.3 template tests loop.last, so a system message jumps once an answer follows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.last %}[SYS]{% endif %}[INST]{{ m['content'] }}"
        "[/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DistillError, match="renders the prompt differently"):
        finetune.tokenize_prompt_completion(tok, [{"role": "user", "content": "hi"}],
                                            [{"role": "assistant", "content": "x"}], 64)


def test_an_example_longer_than_max_seq_len_is_dropped_not_truncated(tokenizers):
    """A cut example loses its answer's EOS; curate promises dropped, never truncated, and so does finetune."""
    from datasets import Dataset

    tokenizer, _ = tokenizers["smollm2"]
    rows = [{"prompt": "where is my parcel", "completion": "track_order"},
            {"prompt": "where is my parcel", "completion": "track order " * 40}]  # fits but for its answer
    train = finetune.tokenize_dataset(finetune.to_prompt_completion(Dataset.from_list(rows)), tokenizer, max_len=64)
    assert len(train) == 1
    (kept,) = list(train)
    assert kept["input_ids"][-1] == tokenizer.eos_token_id and kept["completion_mask"][-1] == 1
