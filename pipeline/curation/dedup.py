"""Step 3 (exact and near-duplicate prompts) and step 7 (decontamination by n-gram overlap).

They compare what the student reads. Duplicates: a conversation's user and assistant turns
(`ex["prompt"]`) and, when the student keeps it, its system prompt, which must then be the same
too. Decontamination: every turn the student reads, less the word n-grams most of the reference
shares (the template of an app's system prompt, a canned greeting), which would otherwise make
every conversation look like every other."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from pipeline.curation.records import Removal, removal, student_system, student_text

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def quality_key(ex: dict) -> tuple:
    """Sort key, best first: agrees with gold, then answers with a valid label (so a cluster is
    not represented by an off-label answer that step 4 would drop), then higher teacher logprob,
    then smaller id (only so that ties resolve the same way on every run)."""
    logprobs = [s["logprob"] for s in ex["samples"] if s["logprob"] is not None]
    mean = sum(logprobs) / len(logprobs) if logprobs else float("-inf")
    has_label = any(s["label"] for s in ex["samples"])
    return (not ex["gold_agrees"], not has_label, -mean, ex["id"])


# ---------------------------------------------------------------- exact


def step_exact_dedupe(examples: list[dict]) -> tuple[list[dict], list[Removal]]:
    """Same normalised conversation as the student reads it (case-folded). Records that are
    numbered samples of one prompt (`meta.sample`, capture with n>1) are merged into one example
    for step 5; other repeats keep only the best-rated copy."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for ex in examples:
        groups.setdefault((student_system(ex).casefold(), ex["prompt"].casefold()), []).append(ex)
    kept, removed = [], []
    for group in groups.values():
        if len(group) > 1 and all(ex["sample"] is not None for ex in group):
            kept.append(_merge_samples(group))
            continue
        best, *rest = sorted(group, key=quality_key)
        kept.append(best)
        removed += [removal(ex, "exact_duplicate", f"same prompt as {best['id']}") for ex in rest]
    return kept, removed


def _merge_samples(group: list[dict]) -> dict:
    first = min(group, key=lambda ex: ex["id"])
    merged = dict(first)
    merged["samples"] = [s for ex in sorted(group, key=lambda ex: ex["id"]) for s in ex["samples"]]
    merged["gold_agrees"] = any(ex["gold_agrees"] for ex in group)
    return merged


# ---------------------------------------------------------------- near-duplicates


def shingles(text: str) -> set[str]:
    """Word unigrams and bigrams: a one-word edit of a 10-word prompt keeps Jaccard near 0.75,
    while bigrams keep word order, so 'cancel, not refund' differs from 'refund, not cancel'."""
    tokens = words(text)
    return set(tokens) | {f"{a} {b}" for a, b in zip(tokens, tokens[1:])}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def step_near_dedupe(
    examples: list[dict], threshold: float | None, num_perm: int, seed: int
) -> tuple[list[dict], list[Removal]]:
    """MinHash LSH finds candidate pairs; exact Jaccard on the shingle sets of their dialogues
    confirms them, among examples with the same system prompt as the student reads it. Examples
    are visited best-rated first, so each cluster keeps its best representative."""
    if threshold is None or len(examples) < 2:
        return list(examples), []
    from datasketch import MinHash, MinHashLSH

    sets = [shingles(ex["prompt"]) for ex in examples]
    systems = [student_system(ex).casefold() for ex in examples]
    hashes = MinHash.bulk([[s.encode() for s in sorted(x)] for x in sets], num_perm=num_perm, seed=seed)
    # A lower LSH threshold than the real one trades a few more exact checks for fewer misses.
    lsh = MinHashLSH(threshold=max(0.1, threshold - 0.15), num_perm=num_perm)
    keep = [False] * len(examples)
    removed = []
    for i in sorted(range(len(examples)), key=lambda i: quality_key(examples[i])):
        same_system = (j for j in map(int, lsh.query(hashes[i])) if systems[j] == systems[i])
        match = _closest(i, same_system, sets, threshold)
        if match is None:
            lsh.insert(str(i), hashes[i])
            keep[i] = True
        else:
            j, score = match
            removed.append(removal(examples[i], "near_duplicate", f"Jaccard {score:.2f} with {examples[j]['id']}"))
    return [ex for ex, k in zip(examples, keep) if k], removed


def _closest(i: int, candidates: Iterable[int], sets: list[set], threshold: float) -> tuple[int, float] | None:
    scored = [(jaccard(sets[i], sets[j]), j) for j in candidates]
    scored = [(score, j) for score, j in scored if score >= threshold]
    if not scored:
        return None
    score, j = min(scored, key=lambda t: (-t[0], t[1]))
    return j, score


# ---------------------------------------------------------------- decontamination


class NgramIndex:
    """Word n-grams of a reference set (train, or an external eval file). Texts shorter than n
    words are indexed whole, so a short prompt only matches an identical short prompt. With at
    least MIN_FOR_TEMPLATE texts, an n-gram in more than `template_share` of them is template, not
    content: left out of the index and of every overlap."""

    MIN_FOR_TEMPLATE = 20

    def __init__(self, texts: Iterable[str], n: int, template_share: float = 0.5):
        self.n = n
        counts: Counter = Counter()
        total = 0
        for text in texts:
            counts.update(self._grams(words(text)))
            total += 1
        limit = template_share * total if total >= self.MIN_FOR_TEMPLATE else float("inf")
        self.template = {g for g, c in counts.items() if c > limit}
        self.grams = set(counts) - self.template

    def _grams(self, tokens: list[str]) -> set[tuple[str, ...]]:
        if len(tokens) < self.n:
            return {tuple(tokens)} if tokens else set()
        return {tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1)}

    def overlap(self, text: str) -> float:
        """Share of text's (non-template) n-grams found in the index (0 when it has none)."""
        grams = self._grams(words(text)) - self.template
        return sum(g in self.grams for g in grams) / len(grams) if grams else 0.0


def step_decontaminate(
    examples: list[dict], reference: NgramIndex, min_overlap: float, reason: str, against: str
) -> tuple[list[dict], list[Removal]]:
    """Drop examples whose text (as the student reads it) shares at least `min_overlap` of its n-grams
    with the reference."""
    kept, removed = [], []
    for ex in examples:
        share = reference.overlap(student_text(ex))
        if share >= min_overlap:
            removed.append(removal(ex, reason, f"{share:.0%} of its {reference.n}-grams occur in {against}"))
        else:
            kept.append(ex)
    return kept, removed
