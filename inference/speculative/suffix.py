"""SuffixDecoding: model-free drafts from a per-request suffix trie and one global trie of previous outputs.

`SuffixCache` is the algorithm keyed by request id (the offline simulator drives it directly); `SuffixProposer`
adapts it to the engine's `Proposer` protocol, learning each sequence's new tokens by comparing
`len(seq.token_ids)` with what it has seen.

Per request the cache holds a cursor into the request's own trie (prompt + tokens so far) and its deepest match in
the global trie, both advanced per appended token; drafting walks match lengths from the longest down, each a
suffix link away, and stops as soon as a shorter match's budget cannot beat the best score found (a draft of n
nodes scores at most n), so a call usually costs one or two draft walks, not one per match length.
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from glassbox.errors import GlassboxError
from glassbox.inference.speculative.draft import EMPTY, Draft
from glassbox.inference.speculative.suffix_tree import SuffixTrie, TreeDraft

if TYPE_CHECKING:
    from glassbox.inference.sequence import Sequence

MODES = ("path", "tree")


class SuffixConfigError(GlassboxError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"suffix speculation: {name} {message}")


@dataclass(frozen=True)
class SuffixConfig:
    max_depth: int = 32              # longest string the tries store (and the longest match length)
    max_spec_tokens: int = 16        # draft nodes per call, at most
    max_spec_factor: float = 1.0     # a match of p tokens drafts up to factor * p + offset tokens
    spec_offset: float = 0.0
    min_token_prob: float = 0.1      # a node's path probability must reach this to be drafted
    mode: str = "tree"               # "path": one branch; "tree": best-first token tree
    max_cached_requests: int = 10000  # global trie: finished requests kept, oldest evicted first

    def __post_init__(self) -> None:
        _check_int("max_depth", self.max_depth, 1)
        _check_int("max_spec_tokens", self.max_spec_tokens, 0)
        _check_int("max_cached_requests", self.max_cached_requests, 0)
        _check_float("max_spec_factor", self.max_spec_factor, 0.0, math.inf)
        _check_float("spec_offset", self.spec_offset, -math.inf, math.inf)
        _check_float("min_token_prob", self.min_token_prob, 0.0, 1.0)
        if self.mode not in MODES:
            raise SuffixConfigError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SuffixConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise SuffixConfigError(", ".join(unknown), f"unknown (known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def budget(self, match_len: int) -> int:
        return max(0, min(self.max_spec_tokens, int(self.max_spec_factor * match_len + self.spec_offset)))


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SuffixConfigError(name, f"must be an integer, got {value!r}")
    if value < lo:
        raise SuffixConfigError(name, f"must be >= {lo}, got {value}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SuffixConfigError(name, f"must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        bounds = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
        raise SuffixConfigError(name, f"must be {bounds}, got {value}")


class _Request:
    """One live request: its own trie with the append cursor, and its match in the global trie."""

    __slots__ = ("trie", "cursor", "tokens", "prompt_len", "global_match", "global_version")

    def __init__(self, max_depth: int) -> None:
        self.trie = SuffixTrie(max_depth)
        self.cursor = 0                 # the trie's node for the request's deepest stored suffix
        self.tokens: list[int] = []
        self.prompt_len = 0
        self.global_match = -1          # the global trie's node for the request's deepest match there
        self.global_version = -1


class SuffixCache:
    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        self.global_trie = SuffixTrie(self.config.max_depth)
        self._cached: OrderedDict[Any, array] = OrderedDict()
        self._cached_tokens = 0
        self._active: dict[Any, _Request] = {}

    # ---- request life cycle -------------------------------------------------------------------------------
    def start(self, req_id: Any, prompt: list[int]) -> None:
        if req_id in self._active:
            raise GlassboxError(f"suffix cache: request {req_id!r} is already active")
        req = self._active[req_id] = _Request(self.config.max_depth)
        self._extend(req, prompt)
        req.prompt_len = len(prompt)

    def extend(self, req_id: Any, tokens: list[int]) -> None:
        self._extend(self._request(req_id), tokens)

    def num_tokens(self, req_id: Any) -> int:
        return len(self._request(req_id).tokens)

    def is_active(self, req_id: Any) -> bool:
        return req_id in self._active

    def finish(self, req_id: Any, learn: bool = True) -> None:
        """Free the request's trie; with `learn`, its output joins the global trie (evicting the oldest)."""
        req = self._active.pop(req_id, None)
        if req is not None and learn:
            self.learn(req_id, req.tokens[req.prompt_len:])

    def learn(self, req_id: Any, output: list[int]) -> None:
        """Add a finished output to the global trie (evicting the oldest beyond the cap)."""
        if not output or self.config.max_cached_requests == 0:
            return
        kept = array("i", output)
        if req_id in self._cached:
            self._evict(req_id)
        while len(self._cached) >= self.config.max_cached_requests:
            self._evict(next(iter(self._cached)))
        self._cached[req_id] = kept
        self._cached_tokens += len(kept)
        self.global_trie.insert(kept)

    def _evict(self, req_id: Any) -> None:
        output = self._cached.pop(req_id)
        self._cached_tokens -= len(output)
        self.global_trie.remove(output)

    def _request(self, req_id: Any) -> _Request:
        req = self._active.get(req_id)
        if req is None:
            raise GlassboxError(f"suffix cache: request {req_id!r} is not active (start it first)")
        return req

    def _extend(self, req: _Request, tokens: list[int]) -> None:
        req.cursor = req.trie.extend(req.cursor, tokens)
        req.tokens.extend(tokens)
        if req.global_version == self.global_trie.version and req.global_match >= 0:
            g = self.global_trie
            m = req.global_match
            for t in tokens:
                m = g.advance(m, t)
            req.global_match = m

    # ---- drafting -----------------------------------------------------------------------------------------
    def draft(self, req_id: Any, max_tokens: int | None = None) -> Draft:
        """The best draft over every match length in the request's trie and the global trie."""
        req = self._request(req_id)
        cfg = self.config
        cap = cfg.max_spec_tokens if max_tokens is None else min(max_tokens, cfg.max_spec_tokens)
        if cap <= 0:
            return EMPTY
        g = self.global_trie
        if req.global_match < 0 or req.global_version != g.version:
            req.global_match = g.match(req.tokens)
            req.global_version = g.version
        lt = req.trie
        local_p, local = self._local_match(lt, req.cursor)
        glob = req.global_match
        if g.depth[glob] >= g.max_depth:  # a node at the depth limit continues at its link: match one shorter
            glob = g.link[glob]
        glob_p = g.depth[glob]
        best: TreeDraft | None = None
        best_score = 0.0
        draw = lt.draft_tree if cfg.mode == "tree" else lt.draft_path
        gdraw = g.draft_tree if cfg.mode == "tree" else g.draft_path
        p = max(local_p, glob_p)
        # Longest match first; at equal length the request's own trie first; only a strictly better score wins.
        while p > 0:
            budget = min(cap, cfg.budget(p))
            if budget <= best_score:
                break
            if local_p == p:
                d = draw(local, budget, cfg.min_token_prob)
                if d.score > best_score:
                    best, best_score = d, d.score
                local_p, local = self._local_match(lt, lt.link[local])
            if glob_p == p:
                d = gdraw(glob, budget, cfg.min_token_prob)
                if d.score > best_score:
                    best, best_score = d, d.score
                glob = g.link[glob]
                glob_p = g.depth[glob]
            p -= 1
        if best is None:
            return EMPTY
        return Draft(tuple(best.tokens), tuple(best.parents), best_score)

    @staticmethod
    def _local_match(trie: SuffixTrie, node: int) -> tuple[int, int]:
        """From `node` (a suffix of the request) down its links to the longest suffix that occurred earlier in
        the request with a continuation: (match length, node)."""
        out, link = trie.out, trie.link
        while node != 0 and out[node] == 0:
            node = link[node]
        return trie.depth[node], node

    # ---- reporting ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        g = self.global_trie
        return {
            "cached_requests": float(len(self._cached)),
            "cached_tokens": float(self._cached_tokens),
            "active_requests": float(len(self._active)),
            "tree_nodes": float(g.num_nodes),
            "tree_bytes": float(g.allocated_nodes() * NODE_BYTES + g.num_dicts * DICT_BYTES
                                + self._cached_tokens * TOKEN_BYTES),
            "active_tree_nodes": float(sum(r.trie.num_nodes for r in self._active.values())),
        }


# Footprint estimates for /metrics (bench/suffix_memory.py checks them against tracemalloc): an allocated node
# slot is one int32 in each of the trie's 6 arrays; a node with 2+ children also owns a small dict and an entry
# in the trie's node -> dict map; kept outputs (eviction replays them) are int32 arrays. A lower bound: the int
# objects inside children dicts are not counted (on the benchmark's traces: 501 reported, 595 measured per token).
NODE_BYTES = 6 * 4
DICT_BYTES = 224 + 48
TOKEN_BYTES = 4


class SuffixProposer:
    """The engine's `Proposer`: per sequence, catch up on its new tokens, then draft."""

    name = "suffix"

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.cache = SuffixCache(config)
        self.config = self.cache.config

    def propose(self, seqs: "list[Sequence]", max_tokens: int) -> list[Draft]:
        out = []
        cache = self.cache
        for seq in seqs:
            sid = seq.seq_id
            ids = seq.token_ids
            seen = cache.num_tokens(sid) if cache.is_active(sid) else -1
            if len(ids) < seen:  # the sequence lost tokens: its trie no longer describes it
                cache.finish(sid, learn=False)
                seen = -1
            if seen < 0:
                cache.start(sid, ids[:seq.prompt_len])
                seen = seq.prompt_len
            if len(ids) > seen:
                cache.extend(sid, ids[seen:])
            out.append(cache.draft(sid, max_tokens))
        return out

    def on_finished(self, seq: "Sequence") -> None:
        """Free the sequence's trie; a completed (not aborted or failed) output joins the global trie."""
        learn = seq.finish_reason not in ("abort", "error")
        if not self.cache.is_active(seq.seq_id):  # never drafted for (e.g. speculation was off for it)
            if learn:
                self.cache.learn(seq.seq_id, seq.token_ids[seq.prompt_len:])
            return
        seen = self.cache.num_tokens(seq.seq_id)
        if len(seq.token_ids) > seen:
            self.cache.extend(seq.seq_id, seq.token_ids[seen:])
        self.cache.finish(seq.seq_id, learn=learn)

    def stats(self) -> dict[str, float]:
        return self.cache.stats()
