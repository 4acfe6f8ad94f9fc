"""Selection on real all-MiniLM-L6-v2 vectors (the `embeddings` extra, installed by `make test`).

The prompts are three kinds of request, three paraphrases each, that share almost no words:
TF-IDF cannot tell the kinds apart, so these tests fail if the MiniLM path is not the one taken.
"""

import numpy as np

from pipeline.curation.records import to_example
from pipeline.curation.selection import embed, embedding_backend, step_select
from pipeline.task import Task

KINDS = [
    ["my parcel never arrived", "the package I ordered still hasn't shown up", "where is my delivery"],
    ["I want my money back", "please reimburse me for the lamp", "can I get a refund"],
    ["I forgot my password", "can't log in to my account", "reset my login credentials"],
]
TEXTS = [t for kind in KINDS for t in kind]
KIND = {t: k for k, kind in enumerate(KINDS) for t in kind}


def test_minilm_places_paraphrases_nearer_than_other_requests():
    assert embedding_backend("auto") == "minilm"
    vectors = embed(TEXTS, "minilm")
    assert vectors.shape == (9, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    for i, text in enumerate(TEXTS):
        nearest = TEXTS[int(np.argmax(similarity[i]))]
        assert KIND[nearest] == KIND[text], (text, nearest)
    # The first two share no word: what brings them together is meaning, which TF-IDF gives 0.
    assert similarity[0, 1] > 0.4 and (embed(TEXTS[:2], "tfidf") @ embed(TEXTS[:2], "tfidf").T)[0, 1] == 0


def test_selection_on_minilm_keeps_one_of_each_kind_and_balances_labels():
    task = Task(name="t", instructions="Reply with one label.", labels=["needs_agent", "greeting"])
    prompts = [(t, "needs_agent") for t in TEXTS] + [("hello there", "greeting"), ("hi!", "greeting")]
    items = [
        to_example(
            {
                "id": f"p{i:02d}",
                "meta": {"teacher": "openai:t"},
                "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": label}],
            },
            task,
            "user",
        )
        for i, (p, label) in enumerate(prompts)
    ]
    kept, removed, notes = step_select(items, 5, "minilm")
    assert not notes and len(kept) == 5 and len(removed) == 6
    by_label = {label: [ex["prompt"] for ex in kept if ex["label"] == label] for label in task.labels}
    assert sorted(by_label["greeting"]) == ["hello there", "hi!"]  # the small label keeps all it has
    assert sorted(KIND[p] for p in by_label["needs_agent"]) == [0, 1, 2], by_label["needs_agent"]
    assert {(r.reason, r.detail) for r in removed} == {("not_selected", "k-center on minilm")}
