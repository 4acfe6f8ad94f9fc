"""Completion-only loss: the labels that reach the loss are the answer and its end-of-turn token, nothing else.

On the real tokenizers, offline (tests/support/real_tokenizers.py): SmolLM2's own (ChatML), Mistral v0.3's
sentencepiece vocabulary and Llama 3's byte-level BPE, each with the template shipped in
recipes/templates/ and with the model family's published template.
"""

from pathlib import Path

import pytest
from support import real_tokenizers
from support.official_templates import LLAMA3_OFFICIAL, LLAMA31_OFFICIAL, MISTRAL_V03_OFFICIAL

from pipeline.config import LoraConfig, TrainConfig
from pipeline.errors import DistillError
from pipeline.llm.loading import DevicePlan
from pipeline.stages import finetune

ROOT = Path(__file__).resolve().parents[2]
CPU = DevicePlan("cpu", "float32", False, "test")
SYSTEM = "Classify the banking request."
ROWS = [
    {"prompt": "my card never arrived", "completion": "card_arrival"},
    {"prompt": "how do I top up by bank transfer? it has been pending for days", "completion": "pending top up"},
    {"prompt": "refund", "completion": "Request a refund, please."},
    {"prompt": "Où est ma carte ? 2 semaines déjà…", "completion": "40 € manquants: card_arrival"},
]

SHIPPED = {"mistral": "mistral-v0.3.jinja", "llama3": "llama3.jinja", "llama3.2": "llama3.2.jinja"}
OFFICIAL = {
    "mistral-official": MISTRAL_V03_OFFICIAL,
    "llama3-official": LLAMA3_OFFICIAL,
    "llama3.1-official": LLAMA31_OFFICIAL,
}
# How each family's assistant turn ends: the labels must be exactly this, tokenized on its own.
ANSWER = {"smollm2": "{answer}<|im_end|>", "mistral": " {answer}</s>", "llama3": "{answer}<|eot_id|>"}


def _real(family: str, embedded_dir):
    from transformers import AutoTokenizer

    base = "llama3" if family.startswith("llama3") else family.split("-")[0]
    folder = {
        "smollm2": embedded_dir,
        "mistral": real_tokenizers.mistral_v03_dir(),
        "llama3": real_tokenizers.llama3_dir(),
    }[base]
    tok = AutoTokenizer.from_pretrained(folder)
    if family in SHIPPED:
        tok.chat_template = (ROOT / "recipes" / "templates" / SHIPPED[family]).read_text()
    elif family in OFFICIAL:
        tok.chat_template = OFFICIAL[family]
    return tok, ANSWER[base]


@pytest.fixture(scope="module")
def tokenizers(embedded_dir):
    # smollm2: ChatML; its eos (<|im_end|>) is also its pad token, the case that hides EOS from the loss elsewhere.
    return {f: _real(f, embedded_dir) for f in ["smollm2", *SHIPPED, *OFFICIAL]}


def test_the_tokenizers_are_the_real_ones(tokenizers):
    """Llama 3 reproduces the ids llama.cpp recorded from Meta's tokenizer.json; Mistral v0.3
    encodes like its own sentencepiece model (what mistral-common encodes with)."""
    import sentencepiece

    llama3, _ = tokenizers["llama3"]
    folder = real_tokenizers.llama3_dir()
    texts = (folder / f"{real_tokenizers.LLAMA3_VOCAB}.inp").read_text().split("\n__ggml_vocab_test__\n")[:-1]
    ids = (folder / f"{real_tokenizers.LLAMA3_VOCAB}.out").read_text().splitlines()
    assert len(texts) == len(ids) > 40
    for text, expected in zip(texts, ids):
        assert llama3(text, add_special_tokens=False)["input_ids"] == [int(t) for t in expected.split()], text
    assert (len(llama3), llama3.bos_token, llama3.eos_token, llama3.pad_token) == (
        128256 + 1,
        "<|begin_of_text|>",
        "<|eot_id|>",
        None,
    )

    mistral, _ = tokenizers["mistral"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(real_tokenizers.mistral_v03_dir() / "tokenizer.model"))
    for text in [SYSTEM, *(r[k] for r in ROWS for k in ("prompt", "completion"))]:
        assert mistral(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert mistral.convert_tokens_to_ids(["<s>", "</s>", "[INST]", "[/INST]"]) == [1, 2, 3, 4]
    assert (len(mistral), mistral.pad_token) == (32768, None)


def _prepared(tokenizer, rows, tmp_path, system: str | None = None):
    """What SFTTrainer will feed the model: our tokenization, then TRL's labels."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer

    pairs = finetune.to_prompt_completion(Dataset.from_list(rows), "user")
    if system:
        pairs = pairs.map(lambda ex: {"prompt": [{"role": "system", "content": system}, *ex["prompt"]]})
    train = finetune.tokenize_dataset(pairs, tokenizer, max_len=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=finetune.build_sft_config(TrainConfig(max_steps=1), tmp_path, CPU),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=finetune.build_lora_config(LoraConfig(r=2, alpha=4)),
    )
    return trainer


# The published Mistral template with a system message is refused (the test after the next).
@pytest.mark.parametrize(
    "family,system",
    [(f, s) for s in (None, SYSTEM) for f in ["smollm2", *SHIPPED, *OFFICIAL] if not (f == "mistral-official" and s)],
)
def test_labels_are_exactly_the_answer_and_its_eos(family, system, tokenizers, tmp_path):
    tokenizer, answer_format = tokenizers[family]
    trainer = _prepared(tokenizer, ROWS, tmp_path, system)
    assert len(trainer.train_dataset) == len(ROWS)
    for row, ex in zip(ROWS, trainer.train_dataset):
        ids, labels = ex["input_ids"], ex["labels"]
        trained = [t for t in labels if t != -100]
        expected = tokenizer(answer_format.format(answer=row["completion"]), add_special_tokens=False)["input_ids"]
        assert trained == expected, tokenizer.decode(trained)
        assert trained[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in trained[:-1]
        assert tokenizer.decode(trained[:-1]).strip() == row["completion"]
        # The trained tokens are the tail of the sequence; everything before them is the prompt as inference renders it.
        n = len(trained)
        assert labels[-n:] == ids[-n:] and all(t == -100 for t in labels[:-n])
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": row["prompt"]}
        ]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(ids[:-n]) == prompt
        assert ids[:-n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if family != "smollm2":  # (SmolLM2's BOS is <|im_start|>, which opens every turn)
            assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id  # the template's


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_mistral_ids_are_mistral_commons_v3_encoding(system, tokenizers, tmp_path):
    """mistral-common's v3 tokenizer: <s>[INST] + sp(user, the system text and a blank line before the
    last one) + [/INST] + sp(answer) + </s>, each piece encoded by sentencepiece on its own."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(real_tokenizers.mistral_v03_dir() / "tokenizer.model"))
    tokenizer, _ = tokenizers["mistral"]
    trainer = _prepared(tokenizer, ROWS, tmp_path, system)
    for row, ex in zip(ROWS, trainer.train_dataset):
        user = f"{system}\n\n{row['prompt']}" if system else row["prompt"]
        answer = sp.encode(row["completion"]) + [sp.eos_id()]
        assert ex["input_ids"] == [sp.bos_id(), 3, *sp.encode(user), 4, *answer]
        assert [t for t in ex["labels"] if t != -100] == answer


def test_the_published_mistral_template_with_a_system_message_is_refused(tokenizers):
    tokenizer, _ = tokenizers["mistral-official"]
    with pytest.raises(DistillError, match="renders the prompt differently"):
        finetune.tokenize_prompt_completion(
            tokenizer,
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "refund"}],
            [{"role": "assistant", "content": "refund"}],
            256,
        )


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
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(DistillError, match="does not end the assistant turn with the EOS token"):
        finetune.tokenize_prompt_completion(
            tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "card_arrival"}], 64
        )


def test_template_that_moves_the_prompt_is_refused(embedded_dir):
    """The published Mistral v0.3 template tests loop.last, so a system message jumps once an answer follows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.last %}[SYS]{% endif %}[INST]{{ m['content'] }}"
        "[/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DistillError, match="renders the prompt differently"):
        finetune.tokenize_prompt_completion(
            tok, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "x"}], 64
        )


def test_an_example_longer_than_max_seq_len_is_dropped_not_truncated(tokenizers):
    """A cut example loses its answer's EOS; curate promises dropped, never truncated, and so does finetune."""
    from datasets import Dataset

    tokenizer, _ = tokenizers["smollm2"]
    rows = [
        {"prompt": "where is my parcel", "completion": "track_order"},
        {"prompt": "where is my parcel", "completion": "track order " * 40},
    ]  # fits but for its answer
    train = finetune.tokenize_dataset(
        finetune.to_prompt_completion(Dataset.from_list(rows), "user"), tokenizer, max_len=64
    )
    assert len(train) == 1
    (kept,) = list(train)
    assert kept["input_ids"][-1] == tokenizer.eos_token_id and kept["completion_mask"][-1] == 1


# ---------------------------------------------------------------- whole conversations

# Curated rows of conversations as apps send them: a system prompt with per-request data, earlier
# exchanges; the loss must fall on the final answer only.
CONVERSATIONS = [
    {
        "messages": [
            {"role": "system", "content": "Customer profile: Premium since 2015."},
            {"role": "user", "content": "hi, it's about order A-12"},
            {"role": "assistant", "content": "Sure, what happened to it?"},
            {"role": "user", "content": "it never arrived"},
        ],
        "completion": "track_order",
    },
    {
        "messages": [
            {"role": "developer", "content": "Classify the banking request."},
            {"role": "user", "content": "my card"},
            {"role": "assistant", "content": "Which card?"},
            {"role": "user", "content": "the new one, 2 weeks"},
            {"role": "assistant", "content": "I see."},
            {"role": "user", "content": "Où est ma carte ?"},
        ],
        "completion": "40 € manquants: card_arrival",
    },
    {
        "messages": [
            {"role": "user", "content": "refund"},
            {"role": "assistant", "content": "For which order?"},
            {"role": "user", "content": "the last one"},
        ],
        "completion": "Request a refund, please.",
    },
]


@pytest.mark.parametrize("shape", ["conversation", "user"])
@pytest.mark.parametrize("family", ["smollm2", *SHIPPED, "llama3-official", "llama3.1-official"])
def test_multi_turn_loss_is_on_the_final_answer_only(family, shape, tokenizers, tmp_path):
    """Earlier assistant turns are context: in the input, masked out of the labels. The prompt the
    loss follows is what inference renders for what the student sees (student_messages)."""
    from datasets import Dataset

    from pipeline.conversation import student_messages

    tokenizer, answer_format = tokenizers[family]
    pairs = finetune.to_prompt_completion(Dataset.from_list(CONVERSATIONS), shape)
    train = finetune.tokenize_dataset(pairs, tokenizer, max_len=512)
    assert len(train) == len(CONVERSATIONS)
    for row, ex in zip(CONVERSATIONS, train):
        ids, mask = ex["input_ids"], ex["completion_mask"]
        trained = [t for t, m in zip(ids, mask) if m]
        assert (
            trained == tokenizer(answer_format.format(answer=row["completion"]), add_special_tokens=False)["input_ids"]
        )
        n = len(trained)
        assert mask[-n:] == [1] * n and not any(mask[:-n])
        prompt = tokenizer.apply_chat_template(
            student_messages(row["messages"], shape), add_generation_prompt=True, tokenize=False
        )
        assert ids[:-n] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        context = tokenizer.decode(ids[:-n])
        for turn in row["messages"]:
            shown = shape == "conversation" or turn["role"] not in ("system", "developer")
            assert (turn["content"] in context) == shown, (turn, context)


@pytest.mark.parametrize("shape", ["conversation", "user"])
def test_multi_turn_mistral_ids_are_mistral_commons_v3_encoding(shape, tokenizers):
    """mistral-common's v3 encoding of a conversation: every turn's pieces encoded on their own, the
    system text before the LAST user message; labels on the final answer and its </s> only."""
    import sentencepiece
    from datasets import Dataset

    sp = sentencepiece.SentencePieceProcessor(model_file=str(real_tokenizers.mistral_v03_dir() / "tokenizer.model"))
    tokenizer, _ = tokenizers["mistral"]
    train = finetune.tokenize_dataset(
        finetune.to_prompt_completion(Dataset.from_list(CONVERSATIONS), shape), tokenizer, max_len=512
    )
    for row, ex in zip(CONVERSATIONS, train):
        system = "\n\n".join(m["content"] for m in row["messages"] if m["role"] in ("system", "developer"))
        turns = [m for m in row["messages"] if m["role"] not in ("system", "developer")]
        last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
        expected = [sp.bos_id()]
        for i, m in enumerate(turns):
            if m["role"] == "user":
                text = (
                    f"{system}\n\n{m['content']}"
                    if shape == "conversation" and system and i == last_user
                    else m["content"]
                )
                expected += [3, *sp.encode(text), 4]
            else:
                expected += [*sp.encode(m["content"]), sp.eos_id()]
        answer = sp.encode(row["completion"]) + [sp.eos_id()]
        assert ex["input_ids"] == expected + answer
        assert [t for t, m in zip(ex["input_ids"], ex["completion_mask"]) if m] == answer
