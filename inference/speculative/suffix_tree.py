"""A depth-limited suffix trie with counts and suffix links: the data structure behind SuffixDecoding.

Every suffix of every inserted token stream is stored up to `max_depth` tokens, so a node stands for one string
s (|s| <= max_depth) and counts its occurrences; `out` is how many of those occurrences have a next token, so
`child.count / node.out` is the empirical probability of that continuation (an occurrence at the very end of a
stream has none and must not dilute it).

Why suffix links (node for s -> node for s[1:]):
- appending a token to a stream visits the stream's current suffixes deepest first by following links from one
  cursor, and creates each new node's link on the way, so nothing is rebuilt or re-matched from the root;
- a reader tracking its context in a trie it does not write to (the global tree) advances its deepest match in
  O(1) amortized per token, and every shorter match length is one link away;
- a draft never stops at the depth limit: below a node at `max_depth` the walk continues from its link (the same
  string minus its oldest token), so long drafts stay possible after long matches.

Each node keeps its most frequent child (`best`, ties to the smaller token id), updated in O(1) when counts grow,
so path drafting never scans siblings; the full order is computed only for nodes a tree draft expands. Most
nodes have one child, held in `best` alone; a children dict exists only from the second child on.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class TreeDraft:
    """A draft in trie terms: tokens, parent indices (-1 under the context), per-node path probabilities."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]

    @property
    def score(self) -> float:
        return sum(self.probs)


class SuffixTrie:
    """Nodes are ints indexing parallel lists (root = 0), not objects: the lists hold only ints and the children
    dicts only ints, which Python's cyclic garbage collector does not track. As objects, millions of nodes with
    links (suffix links form cycles) made every collection a pause and kept freed tries alive until one ran."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.token = [-1]
        self.depth = [0]
        self.count = [0]
        self.out = [0]
        self.best = [-1]                      # the most frequent child; the only child when `kids` is None
        self.link = [0]
        self.kids: list[dict[int, int] | None] = [None]   # token -> child, only for nodes with 2+ children
        self.free: list[int] = []
        self.num_nodes = 0
        self.num_dicts = 0
        # Bumped by insert and remove, so readers holding a match (possibly freed, possibly no longer the
        # deepest) re-match.
        self.version = 0

    # ---- writing ------------------------------------------------------------------------------------------
    def _new_node(self, token: int, depth: int) -> int:
        self.num_nodes += 1
        if self.free:
            c = self.free.pop()
            self.token[c] = token
            self.depth[c] = depth
            self.count[c] = self.out[c] = 0
            self.best[c] = self.link[c] = -1
            return c
        self.token.append(token)
        self.depth.append(depth)
        self.count.append(0)
        self.out.append(0)
        self.best.append(-1)
        self.link.append(-1)
        self.kids.append(None)
        return len(self.token) - 1

    def child(self, node: int, token: int) -> int:
        b = self.best[node]
        if b >= 0 and self.token[b] == token:
            return b
        k = self.kids[node]
        return k.get(token, -1) if k is not None else -1

    def append(self, cursor: int, token: int) -> int:
        """Extend the stream whose suffixes end at `cursor` (its deepest suffix node, depth < max_depth) by
        `token`; returns the new cursor. Costs one step per stored suffix (min(length, max_depth))."""
        limit = self.max_depth
        tok, depth, count, out, best, link, kids = (self.token, self.depth, self.count, self.out, self.best,
                                                    self.link, self.kids)
        a = cursor
        last = new_cursor = -1
        while True:
            b = best[a]
            if b >= 0 and tok[b] == token:
                c = b
            else:
                k = kids[a]
                c = k.get(token, -1) if k is not None else -1
                if c < 0:
                    c = self._new_node(token, depth[a] + 1)
                    if b >= 0:
                        if k is None:
                            k = kids[a] = {tok[b]: b}
                            self.num_dicts += 1
                        k[token] = c
            count[c] += 1
            out[a] += 1
            b = best[a]
            if b < 0 or count[c] > count[b] or (count[c] == count[b] and token < tok[b]):
                best[a] = c
            if last >= 0 and link[last] < 0:
                link[last] = c
            if new_cursor < 0 and depth[c] < limit:
                new_cursor = c
            last = c
            if a == 0:
                break
            a = link[a]
        if link[last] < 0:
            link[last] = 0
        return new_cursor if new_cursor >= 0 else 0

    def insert(self, tokens: list[int]) -> None:
        """Add a whole stream (a finished output). Readers re-match: a longer match may exist now."""
        cursor = 0
        for t in tokens:
            cursor = self.append(cursor, t)
        self.version += 1

    def remove(self, tokens: list[int]) -> None:
        """Undo `insert(tokens)`: every window's counts go down, nodes left with no occurrence are freed (a
        node's occurrences bound its descendants', so a freed node's subtree is this window's path only)."""
        limit = self.max_depth
        count, out = self.count, self.out
        n = len(tokens)
        for i in range(n):
            a = 0
            for j in range(i, min(n, i + limit)):
                c = self.child(a, tokens[j])
                count[c] -= 1
                out[a] -= 1
                if count[c] == 0:
                    self._unlink_child(a, c)
                    self._free_subtree(c)
                    break
                if self.best[a] == c:
                    self._rerank(a)
                a = c
        self.version += 1

    def _unlink_child(self, a: int, c: int) -> None:
        k = self.kids[a]
        if k is None:
            self.best[a] = -1
            return
        del k[self.token[c]]
        if len(k) == 1:
            self.kids[a] = None
            self.num_dicts -= 1
            self.best[a] = next(iter(k.values()))
        elif self.best[a] == c:
            self._rerank(a)

    def _rerank(self, a: int) -> None:
        k = self.kids[a]
        if k is not None:
            self.best[a] = min(k.values(), key=lambda c: (-self.count[c], self.token[c]))

    def _free_subtree(self, node: int) -> None:
        stack = [node]
        while stack:
            x = stack.pop()
            stack.extend(self.children(x))
            if self.kids[x] is not None:
                self.kids[x] = None
                self.num_dicts -= 1
            self.best[x] = -1
            self.num_nodes -= 1
            self.free.append(x)

    # ---- reading ------------------------------------------------------------------------------------------
    def children(self, node: int) -> list[int]:
        k = self.kids[node]
        if k is not None:
            return list(k.values())
        return [self.best[node]] if self.best[node] >= 0 else []

    def ranked_children(self, node: int, keep: int | None = None) -> list[int]:
        """Children best first: by count, ties to the smaller token id (deterministic, history independent);
        only the first `keep` when given."""
        k = self.kids[node]
        if k is None:
            return [self.best[node]] if self.best[node] >= 0 else []
        count, tok = self.count, self.token
        if keep is not None and keep < len(k):
            return heapq.nsmallest(keep, k.values(), key=lambda c: (-count[c], tok[c]))
        return sorted(k.values(), key=lambda c: (-count[c], tok[c]))

    def advance(self, match: int, token: int) -> int:
        """The deepest node matching (context + token)'s suffix, given `match` for the context's."""
        limit = self.max_depth
        depth, link = self.depth, self.link
        while True:
            if depth[match] < limit:
                c = self.child(match, token)
                if c >= 0:
                    return c
            if match == 0:
                return 0
            match = link[match]

    def match(self, context: list[int]) -> int:
        m = 0
        for t in context[-self.max_depth:]:
            m = self.advance(m, t)
        return m

    def draft_path(self, node: int, budget: int, min_prob: float) -> TreeDraft:
        """Follow the most frequent continuation while the path probability stays >= min_prob."""
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        limit = self.max_depth
        depth, link, best, count, out, tok = self.depth, self.link, self.best, self.count, self.out, self.token
        n = link[node] if depth[node] >= limit else node
        while len(tokens) < budget:
            c = best[n]
            if c < 0:
                break
            prob *= count[c] / out[n]
            if prob < min_prob:
                break
            tokens.append(tok[c])
            probs.append(prob)
            n = link[c] if depth[c] >= limit else c
        return TreeDraft(tokens, list(range(-1, len(tokens) - 1)), probs)

    def draft_tree(self, node: int, budget: int, min_prob: float) -> TreeDraft:
        """Best-first expansion by path probability: the `budget` most likely nodes with probability >= min_prob.
        A node's first child enters the heap when the node is taken, its next sibling when it is taken, so the
        heap never holds more than two entries per taken node. The r-th most frequent child has probability at
        most 1/r, so only the first 1/min_prob children of a node can ever be drafted."""
        keep = int(1.0 / min_prob + 1e-9) if min_prob > 0 else None
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        limit = self.max_depth
        depth, link, best, count, out, tok = self.depth, self.link, self.best, self.count, self.out, self.token
        start = link[node] if depth[node] >= limit else node
        heap: list[tuple[float, int, int, list[int], int, float, int]] = []
        order = 0
        b = best[start]
        if b >= 0:
            p = count[b] / out[start]
            if p >= min_prob:
                heap.append((-p, order, -1, self.ranked_children(start, keep), 0, 1.0, out[start]))
        while heap and len(tokens) < budget:
            neg, _, parent, ranked, i, parent_prob, total = heapq.heappop(heap)
            c = ranked[i]
            idx = len(tokens)
            tokens.append(tok[c])
            parents.append(parent)
            probs.append(-neg)
            if i + 1 < len(ranked):
                p = parent_prob * count[ranked[i + 1]] / total
                if p >= min_prob:
                    order += 1
                    heapq.heappush(heap, (-p, order, parent, ranked, i + 1, parent_prob, total))
            n = link[c] if depth[c] >= limit else c
            b = best[n]
            if b >= 0:
                p = -neg * count[b] / out[n]
                if p >= min_prob:
                    order += 1
                    heapq.heappush(heap, (-p, order, idx, self.ranked_children(n, keep), 0, -neg, out[n]))
        return TreeDraft(tokens, parents, probs)

    # ---- checking -----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the invariants (tests and debugging): counts and outs agree, `best` is the top child, links
        point one token shorter, single children live in `best` alone, the node and dict counts are right."""
        seen = dicts = 0
        stack = [0]
        while stack:
            x = stack.pop()
            kids = self.children(x)
            k = self.kids[x]
            assert (k is None) == (len(kids) <= 1), "a children dict exists exactly for 2+ children"
            dicts += k is not None
            assert all(self.token[c] == t for t, c in (k or {}).items())
            assert self.out[x] == sum(self.count[c] for c in kids), "out != sum of child counts"
            top = min(kids, key=lambda c: (-self.count[c], self.token[c])) if kids else -1
            assert self.best[x] == top, "best is not the top child"
            for c in kids:
                assert self.count[c] > 0 and self.depth[c] == self.depth[x] + 1 <= self.max_depth
                assert self.count[c] >= self.out[c]
                lk = self.link[c]
                assert lk >= 0 and self.depth[lk] == self.depth[c] - 1
                assert lk == 0 or self.count[lk] >= self.count[c], "a suffix occurs at least as often as its extension"
                seen += 1
                stack.append(c)
        assert seen == self.num_nodes, f"num_nodes {self.num_nodes} != {seen}"
        assert dicts == self.num_dicts, f"num_dicts {self.num_dicts} != {dicts}"
