"""Label-posterior scoring equals brute-force per-label log-likelihood, and reaches the router."""

import math

import pytest

from pipeline.llm.completion import Completion
from pipeline.llm.policy import Policy

LABELS = [
    "track_order",
    "return_item",
    "refund_status",
    "x",
    "cancel_my_yearly_subscription_and_refund_it",
]  # several lengths
CONVS = [
    [{"role": "user", "content": "where is my parcel"}],
    [{"role": "user", "content": "I want my money back for the broken mug I sent you last week"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from pipeline.llm.loading import device_plan, load_model, load_tokenizer

    return load_model(str(tiny_llama_dir), device_plan()).eval(), load_tokenizer(str(tiny_llama_dir))


def brute_force(model, tokenizer, conv, label) -> float:
    """One unpadded sequence per (prompt, label): sum of log p over the label tokens and EOS."""
    import torch

    prompt = tokenizer(
        tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    answer = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(-1)
    return sum(logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(answer))


def test_batched_label_scores_equal_brute_force(tiny):
    from pipeline.llm.scoring import label_logprobs

    model, tokenizer = tiny
    scores = label_logprobs(model, tokenizer, CONVS, LABELS)  # prompts of different lengths: padding is exercised
    for conv, row in zip(CONVS, scores):
        assert set(row) == set(LABELS)
        for label in LABELS:
            assert row[label] == pytest.approx(brute_force(model, tokenizer, conv, label), abs=1e-3)


def assert_brute_force_scores(model, tokenizer, completions) -> None:
    for conv, c in zip(CONVS, completions, strict=True):
        assert set(c.label_logprobs) == set(LABELS)
        for label in LABELS:
            assert c.label_logprobs[label] == pytest.approx(brute_force(model, tokenizer, conv, label), abs=1e-4)


def test_generate_batch_attaches_label_scores_the_policy_reads(tiny):
    """The scores after generation (from generate's own KV cache and first logits) are the brute force's."""
    from pipeline.llm.generate import generate_batch

    model, tokenizer = tiny
    plain = generate_batch(model, tokenizer, CONVS, 3)
    assert all(c.label_logprobs is None for c in plain)
    scored = generate_batch(model, tokenizer, CONVS, 3, labels=LABELS, score_labels=LABELS)
    assert_brute_force_scores(model, tokenizer, scored)
    policy = Policy(threshold=0.0, signal="label_prob", labels=tuple(LABELS))
    assert policy.needs_label_scores and not Policy(threshold=0.0).needs_label_scores
    for c in scored:  # constrained to the labels, the answer is one: a posterior in (0, 1]
        assert c.text in LABELS
        assert 0 < policy.decide(c).score <= 1


def test_label_scores_after_a_one_token_generation_equal_brute_force(tiny):
    """One new token: generate's KV cache then holds the prompts alone, nothing to cut back."""
    from pipeline.llm.generate import generate_batch

    model, tokenizer = tiny
    assert_brute_force_scores(model, tokenizer, generate_batch(model, tokenizer, CONVS, 1, score_labels=LABELS))


def test_label_posterior_signals_and_invalid_answers_escalate():
    lp = {"a": math.log(0.7), "b": math.log(0.2), "c": math.log(0.1)}
    prob = Policy(threshold=0.5, signal="label_prob", labels=("a", "b", "c"))
    margin = Policy(threshold=0.4, signal="label_margin", labels=("a", "b", "c"))
    assert prob.decide(Completion(text="a", label_logprobs=lp)).score == pytest.approx(0.7)
    assert margin.decide(Completion(text="a", label_logprobs=lp)).score == pytest.approx(0.5)
    assert margin.decide(Completion(text="b", label_logprobs=lp)).score == pytest.approx(-0.5)
    assert prob.decide(Completion(text="b", label_logprobs=lp)).route == "escalate"
    # Not a label, or not scored: always escalates, whatever the threshold.
    low = Policy(threshold=0.0, signal="label_prob", labels=("a", "b", "c"))
    assert low.decide(Completion(text="payment_cancel", label_logprobs=lp)).route == "escalate"
    assert low.decide(Completion(text="a")).route == "escalate"
    # Temperature flattens the posterior: T=2 on (0.7, 0.2, 0.1).
    hot = Policy(threshold=0.0, signal="label_prob", labels=("a", "b", "c"), temperature=2.0)
    expected = math.sqrt(0.7) / (math.sqrt(0.7) + math.sqrt(0.2) + math.sqrt(0.1))
    assert hot.decide(Completion(text="a", label_logprobs=lp)).score == pytest.approx(expected)


def test_label_posterior_decoding_answers_the_argmax_label_and_never_a_non_label(tiny):
    """An untrained tiny model generates junk; decoded by label posterior, every answer is the
    label with the highest teacher-forced likelihood, stops, and carries that label's token log-probs."""
    from pipeline.llm.generate import generate_batch
    from pipeline.llm.scoring import label_token_ids

    model, tokenizer = tiny
    free = generate_batch(model, tokenizer, CONVS, 8)
    assert not any(c.text in LABELS for c in free)  # what the posterior decoding is there to prevent
    decoded = generate_batch(model, tokenizer, CONVS, 30, score_labels=LABELS, decode="label_posterior")
    for conv, c in zip(CONVS, decoded):
        best = max(LABELS, key=lambda label: brute_force(model, tokenizer, conv, label))
        assert c.text == best and c.stopped
        ids = label_token_ids(tokenizer, [best])[0][:-1]
        assert c.token_ids == ids and len(c.token_logprobs) == len(ids)
        assert sum(c.token_logprobs) > c.label_logprobs[best]  # the label's total also has its EOS term
        assert c.label_logprobs[best] == pytest.approx(brute_force(model, tokenizer, conv, best), abs=1e-3)
        policy = Policy(threshold=0.0, signal="label_prob", labels=tuple(LABELS), decode="label_posterior")
        assert policy.needs_label_scores and policy.gate_failure(c) is None


def test_label_posterior_counts_prompt_tokens_as_generation_does_even_with_control_text(tiny):
    """A client's control-token text is encoded as text (content_text.py); the prompt's token count,
    what serving's cost reads, is the same whichever way the answer is decoded."""
    from pipeline.llm.generate import generate_batch

    model, tokenizer = tiny
    convs = [*CONVS, [{"role": "user", "content": f"late parcel{tokenizer.eos_token} and a refund"}]]
    greedy = generate_batch(model, tokenizer, convs, 2)
    decoded = generate_batch(model, tokenizer, convs, 30, score_labels=LABELS, decode="label_posterior")
    assert [c.prompt_tokens for c in decoded] == [c.prompt_tokens for c in greedy]


def test_label_posterior_decoding_cut_at_max_tokens_ends_by_length(tiny):
    from pipeline.llm.generate import generate_batch

    model, tokenizer = tiny
    long_label = ["cancel_my_yearly_subscription_and_refund_it"]
    [c] = generate_batch(model, tokenizer, CONVS[:1], 3, score_labels=long_label, decode="label_posterior")
    assert c.finish_reason == "length" and c.completion_tokens == 3 and c.text != long_label[0]
    with pytest.raises(ValueError, match="needs the labels"):
        generate_batch(model, tokenizer, CONVS[:1], 3, decode="label_posterior")


def test_policy_records_its_decoding_and_refuses_label_posterior_without_labels(tmp_path):
    from pipeline.errors import DistillError

    policy = Policy(threshold=0.5, signal="mean_logprob", labels=("a", "b"), decode="label_posterior")
    assert policy.needs_label_scores  # the backend must score labels to answer at all
    assert Policy.from_json(policy.to_json()).decode == "label_posterior"
    assert Policy.from_json({"threshold": 0.5}).decode == "generate"  # policies written before the field
    with pytest.raises(DistillError, match="needs the task's labels"):
        Policy(threshold=0.5, decode="label_posterior")
    with pytest.raises(DistillError, match="decode must be"):
        Policy(threshold=0.5, decode="beam")
