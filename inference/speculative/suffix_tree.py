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
so path drafting never scans siblings; a tree draft ranks a node's other children only when one of them could
still reach min_token_prob. Most nodes have one child, held in `best` alone; a children dict exists only from the
second child on.

The append loop and both drafting walks also exist in C (_suffix_trie.c, built by `pip install` when a compiler
is there) working on the same arrays; the Python code here is the fallback and the reference the tests hold the
C code to.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

from glassbox.errors import GlassboxError

try:
    from glassbox.inference.speculative import _suffix_trie as _native
except ImportError:  # built by `pip install` when a C compiler is there; the Python path is the same trie
    _native = None

_CHUNK = 1024  # tokens per native extend call


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
    """Nodes are ints indexing parallel int32 arrays (root = 0), not objects: arrays and int-only dicts are
    invisible to Python's cyclic garbage collector. As objects (or in lists), millions of nodes made every full
    collection a pause of milliseconds inside drafting calls, and suffix links (which form cycles) kept freed
    tries alive until one ran. A node costs 24 bytes, plus a small dict if it has 2+ children."""

    def __init__(self, max_depth: int, native: bool | None = None) -> None:
        """`native`: append and draft through the C extension (None: when it is built; False: pure Python)."""
        if native and _native is None:
            raise GlassboxError("the suffix trie's C extension is not built (reinstall glassbox with a compiler)")
        self.native = _native is not None if native is None else native
        self.max_depth = max_depth
        # Arrays are allocated ahead (`size` slots used) so the C extension can write into them in place.
        self.token = array("i", [-1])
        self.depth = array("i", [0])
        self.count = array("i", [0])
        self.out = array("i", [0])
        self.best = array("i", [-1])          # the most frequent child; the only child when it has no `kids` entry
        self.link = array("i", [0])
        self.kids: dict[int, dict[int, int]] = {}  # node -> {token: child}, only for nodes with 2+ children
        self.free = array("i")                # freed slots, the first `nfree` of it
        self.size = 1
        self.nfree = 0
        self.num_nodes = 0
        self.num_dicts = 0
        # Bumped by insert and remove, so readers holding a match (possibly freed, possibly no longer the
        # deepest) re-match.
        self.version = 0

    # ---- writing ------------------------------------------------------------------------------------------
    def _reserve(self, nodes: int) -> None:
        """Room for `nodes` more nodes without growing an array mid-append."""
        need = self.size + max(0, nodes - self.nfree)
        have = len(self.token)
        if need > have:
            grow = bytes(4 * max(need - have, have))
            for a in (self.token, self.depth, self.count, self.out, self.best, self.link):
                a.frombytes(grow)

    def allocated_nodes(self) -> int:
        """Node slots the arrays hold (used, free and reserved): what the trie costs in memory."""
        return len(self.token)

    def _new_node(self, token: int, depth: int) -> int:
        self.num_nodes += 1
        if self.nfree:
            self.nfree -= 1
            c = self.free[self.nfree]
        else:
            c = self.size
            self.size += 1
        self.token[c] = token
        self.depth[c] = depth
        self.count[c] = self.out[c] = 0
        self.best[c] = self.link[c] = -1
        return c

    def child(self, node: int, token: int) -> int:
        b = self.best[node]
        if b >= 0 and self.token[b] == token:
            return b
        k = self.kids.get(node)
        return k.get(token, -1) if k is not None else -1

    def extend(self, cursor: int, tokens: list[int]) -> int:
        """`append` each token in turn (in C when built); returns the new cursor."""
        # In chunks, so the worst-case reservation (every token a new node at every depth) stays small.
        for lo in range(0, len(tokens), _CHUNK):
            chunk = tokens[lo:lo + _CHUNK]
            self._reserve(len(chunk) * self.max_depth)
            if not self.native:
                for t in chunk:
                    cursor = self.append(cursor, t)
                continue
            fields = (*self._fields(), self.free)
            cursor, self.size, self.nfree, nodes, dicts = _native.extend(
                fields, self.kids, self.nfree, self.size, cursor, chunk, self.max_depth)
            self.num_nodes += nodes
            self.num_dicts += dicts
        return cursor

    def append(self, cursor: int, token: int) -> int:
        """Extend the stream whose suffixes end at `cursor` (its deepest suffix node, depth < max_depth) by
        `token`; returns the new cursor. Costs one step per stored suffix (min(length, max_depth)). The
        pure-Python reference of the C extension's `extend`; capacity must be reserved (`extend` does)."""
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
                k = kids.get(a)
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
        self.extend(0, tokens)
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
        k = self.kids.get(a)
        if k is None:
            self.best[a] = -1
            return
        del k[self.token[c]]
        if len(k) == 1:
            del self.kids[a]
            self.num_dicts -= 1
            self.best[a] = next(iter(k.values()))
        elif self.best[a] == c:
            self._rerank(a)

    def _rerank(self, a: int) -> None:
        k = self.kids.get(a)
        if k is not None:
            self.best[a] = min(k.values(), key=lambda c: (-self.count[c], self.token[c]))

    def _free_subtree(self, node: int) -> None:
        stack = [node]
        while stack:
            x = stack.pop()
            stack.extend(self.children(x))
            if self.kids.pop(x, None) is not None:
                self.num_dicts -= 1
            self.best[x] = -1
            self.num_nodes -= 1
            if self.nfree == len(self.free):
                self.free.frombytes(bytes(4 * max(16, len(self.free))))
            self.free[self.nfree] = x
            self.nfree += 1

    # ---- reading ------------------------------------------------------------------------------------------
    def children(self, node: int) -> list[int]:
        k = self.kids.get(node)
        if k is not None:
            return list(k.values())
        return [self.best[node]] if self.best[node] >= 0 else []

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

    def _fields(self) -> tuple[array, ...]:
        return (self.token, self.depth, self.count, self.out, self.best, self.link)

    def draft_path(self, node: int, budget: int, min_prob: float) -> TreeDraft:
        """Follow the most frequent continuation while the path probability stays >= min_prob."""
        if self.native:
            return TreeDraft(*_native.draft_path(self._fields(), node, budget, min_prob, self.max_depth))
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
        A node's first child (its `best`) enters the heap when the node is taken, its next sibling when it is
        taken, so the heap never holds more than two entries per taken node. Siblings are ranked only when the
        first is taken and some second could still reach min_prob, and only those that can: shallow nodes have
        thousands of children, and sorting them all made the slowest calls milliseconds long."""
        if self.native:
            return TreeDraft(*_native.draft_tree(self._fields(), self.kids, node, budget, min_prob, self.max_depth))
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        limit = self.max_depth
        depth, link, best, count, out, tok = self.depth, self.link, self.best, self.count, self.out, self.token
        # heap entry: (-prob, order, draft parent, trie node whose children these are, rank, ranked or None,
        # the parent's path probability)
        heap: list[tuple[float, int, int, int, int, list[int] | None, float]] = []
        order = 0
        n = link[node] if depth[node] >= limit else node
        b = best[n]
        if b >= 0 and count[b] / out[n] >= min_prob:
            heap.append((-(count[b] / out[n]), order, -1, n, 0, None, 1.0))
        while heap and len(tokens) < budget:
            neg, _, parent, owner, i, ranked, parent_prob = heapq.heappop(heap)
            c = ranked[i] if ranked is not None else best[owner]
            idx = len(tokens)
            tokens.append(tok[c])
            parents.append(parent)
            probs.append(-neg)
            if ranked is None:
                total = out[owner]
                if parent_prob * (total - count[c]) / total >= min_prob:
                    ranked = self._qualifying_children(owner, parent_prob, min_prob)
            if ranked is not None and i + 1 < len(ranked):
                order += 1
                p = parent_prob * count[ranked[i + 1]] / out[owner]
                heapq.heappush(heap, (-p, order, parent, owner, i + 1, ranked, parent_prob))
            n = link[c] if depth[c] >= limit else c
            b = best[n]
            if b >= 0:
                p = -neg * count[b] / out[n]
                if p >= min_prob:
                    order += 1
                    heapq.heappush(heap, (-p, order, idx, n, 0, None, -neg))
        return TreeDraft(tokens, parents, probs)

    def _qualifying_children(self, node: int, parent_prob: float, min_prob: float) -> list[int]:
        """`node`'s children whose path probability reaches min_prob, best first."""
        count, total = self.count, self.out[node]
        k = self.kids.get(node)
        if k is None:
            return [self.best[node]]
        ok = [c for c in k.values() if parent_prob * count[c] / total >= min_prob]
        tok = self.token
        ok.sort(key=lambda c: (-count[c], tok[c]))
        return ok

    # ---- checking -----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the invariants (tests and debugging): counts and outs agree, `best` is the top child, links
        point one token shorter, single children live in `best` alone, the node and dict counts are right."""
        seen = dicts = 0
        stack = [0]
        while stack:
            x = stack.pop()
            kids = self.children(x)
            k = self.kids.get(x)
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
