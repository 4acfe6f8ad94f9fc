"""A closed label set as a token trie: one node per distinct token prefix of the labels.

Labels share prefixes in the model's tokenization (Banking77's `card_…`, `top_up_…`; "card" and
"card_arrival"), so scoring every label teacher-forced needs each shared prefix run once: the
node of a prefix predicts the next token of every label that continues it (scoring.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelTrie:
    """Node i holds `tokens[i]` at `depths[i]` (0: a label's first token) below `parents[i]`
    (-1: the root, i.e. the prompt). A parent's index is lower than its children's.
    `paths[j]`: label j's nodes, one per token, first token first."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, sequences: list[list[int]]) -> LabelTrie:
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        paths: list[tuple[int, ...]] = []
        children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for seq in sequences:
            node, path = -1, []
            for depth, token in enumerate(seq):
                child = children.get((node, token))
                if child is None:
                    child = children[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    depths.append(depth)
                node = child
                path.append(node)
            paths.append(tuple(path))
        return cls(tuple(tokens), tuple(parents), tuple(depths), tuple(paths))

    def inner_nodes(self) -> list[int]:
        """Nodes with children, in index order (parents first): the only nodes a forward pass runs,
        since a leaf (a label's EOS) predicts no token that is scored."""
        return sorted(set(p for p in self.parents if p >= 0))

    def ancestors_or_self(self, nodes: list[int]) -> list[tuple[int, int]]:
        """(a, b) index pairs into `nodes` where nodes[b] is nodes[a] or one of its ancestors.
        `nodes` must hold every ancestor of each of its nodes (inner_nodes does)."""
        where = {node: i for i, node in enumerate(nodes)}
        pairs = []
        for a, node in enumerate(nodes):
            while node >= 0:
                pairs.append((a, where[node]))
                node = self.parents[node]
        return pairs
