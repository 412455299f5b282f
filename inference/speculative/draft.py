"""A draft is a token tree: what a proposer hands the engine to verify in one forward.

Node i carries `tokens[i]` and hangs under `parents[i]`: -1 means under the sequence's last real token (the root),
otherwise an earlier node, so `parents[i] < i` and nodes are in topological order. A linear draft is the
one-branch case (parents = -1, 0, 1, ...). Siblings are ordered best first: greedy verification accepts at most
one child per node, and rejection sampling tries siblings in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glassbox.errors import GlassboxError


@dataclass(frozen=True)
class Draft:
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    score: float = 0.0          # the proposer's own estimate of accepted tokens (sum of node probabilities)
    depths: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # kids[node + 1]: the children of `node` (-1: the root), best first; verification walks them every step.
    kids: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise GlassboxError(f"draft has {len(self.tokens)} tokens but {len(self.parents)} parents")
        depths: list[int] = []
        kids: list[list[int]] = [[] for _ in range(len(self.parents) + 1)]
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise GlassboxError(f"draft node {i} has parent {p}: parents must be -1 or an earlier node")
            depths.append(1 if p < 0 else depths[p] + 1)
            kids[p + 1].append(i)
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        object.__setattr__(self, "depths", tuple(depths))
        object.__setattr__(self, "kids", tuple(tuple(k) for k in kids))

    @classmethod
    def linear(cls, tokens: list[int] | tuple[int, ...], score: float = 0.0) -> "Draft":
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)), score)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths, default=0)

    def children(self, node: int) -> tuple[int, ...]:
        """Children of `node` (-1 for the root), best first."""
        return self.kids[node + 1]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's first child down to `node`."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def truncated(self, max_nodes: int) -> "Draft":
        """The first `max_nodes` nodes (still a tree: parents precede children)."""
        n = max(0, max_nodes)
        return Draft(self.tokens[:n], self.parents[:n], self.score)


EMPTY = Draft()
