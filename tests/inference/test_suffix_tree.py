"""The suffix trie and SuffixDecoding drafting against brute-force references over small random streams."""

from __future__ import annotations

import heapq
import random
from types import SimpleNamespace

import pytest

from glassbox.errors import GlassboxError
from glassbox.inference.speculative import PROPOSERS, Draft, make_proposer
from glassbox.inference.speculative.suffix import SuffixCache, SuffixConfig, SuffixProposer
from glassbox.inference.speculative import suffix_tree
from glassbox.inference.speculative.suffix_tree import SuffixTrie

IMPLS = [pytest.param(False, id="python"),
         pytest.param(True, id="native", marks=pytest.mark.skipif(suffix_tree._native is None,
                                                                  reason="C extension not built"))]


# ---- brute force: counts straight from the streams ----------------------------------------------------------
def occurrences(corpus: list[list[int]], s: tuple[int, ...]) -> int:
    n = len(s)
    return sum(1 for seq in corpus for i in range(len(seq) - n + 1) if tuple(seq[i:i + n]) == s)


def continuations(corpus: list[list[int]], state: tuple[int, ...], depth: int) -> list[tuple[int, int]]:
    """(token, count) of what follows `state`, best first (count, then smaller token); a state at the depth limit
    continues as its suffix one token shorter, as the trie does."""
    if len(state) >= depth:
        state = state[1:]
    counts: dict[int, int] = {}
    n = len(state)
    for seq in corpus:
        for i in range(len(seq) - n):
            if tuple(seq[i:i + n]) == state:
                counts[seq[i + n]] = counts.get(seq[i + n], 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def ref_path(corpus, state, depth, budget, min_prob):
    tokens, probs, prob = [], [], 1.0
    while len(tokens) < budget:
        nxt = continuations(corpus, state, depth)
        if not nxt:
            break
        total = sum(c for _, c in nxt)
        prob *= nxt[0][1] / total
        if prob < min_prob:
            break
        tokens.append(nxt[0][0])
        probs.append(prob)
        state = (state if len(state) < depth else state[1:]) + (nxt[0][0],)
    return tokens, list(range(-1, len(tokens) - 1)), probs


def ref_tree(corpus, state, depth, budget, min_prob):
    """Best-first: pop the most probable frontier node (ties: first pushed), push its next sibling and first child."""
    tokens, parents, probs = [], [], []
    heap, order = [], 0

    def push(st, parent, ranked, i, parent_prob, total):
        nonlocal order
        p = parent_prob * ranked[i][1] / total
        if p >= min_prob:
            order += 1
            heapq.heappush(heap, (-p, order, st, parent, ranked, i, parent_prob, total))

    first = continuations(corpus, state, depth)
    if first:
        push(state, -1, first, 0, 1.0, sum(c for _, c in first))
    while heap and len(tokens) < budget:
        neg, _, st, parent, ranked, i, parent_prob, total = heapq.heappop(heap)
        idx = len(tokens)
        tokens.append(ranked[i][0])
        parents.append(parent)
        probs.append(-neg)
        if i + 1 < len(ranked):
            push(st, parent, ranked, i + 1, parent_prob, total)
        child = (st if len(st) < depth else st[1:]) + (ranked[i][0],)
        nxt = continuations(corpus, child, depth)
        if nxt:
            push(child, idx, nxt, 0, -neg, sum(c for _, c in nxt))
    return tokens, parents, probs


def ref_draft(context, cached, cfg: SuffixConfig) -> tuple[list[int], list[int], float]:
    """SuffixDecoding's choice: every match length p (longest first, the request's own stream before the cached
    outputs), budget min(K, factor*p + offset), a strictly higher score wins."""
    d = cfg.max_depth
    draw = ref_tree if cfg.mode == "tree" else ref_path
    best, best_score = ([], []), 0.0
    for p in range(min(len(context), d - 1), 0, -1):
        budget = min(cfg.max_spec_tokens, cfg.budget(p))
        state = tuple(context[-p:])
        for corpus in ([context], cached):
            if not continuations(corpus, state, d):
                continue
            toks, pars, probs = draw(corpus, state, d, budget, cfg.min_token_prob)
            if sum(probs) > best_score:
                best, best_score = (toks, pars), sum(probs)
    return best[0], best[1], best_score


def random_stream(rng: random.Random, n: int, vocab: int) -> list[int]:
    """Repetitive enough to make deep matches: copies of earlier pieces mixed with fresh tokens."""
    out: list[int] = []
    while len(out) < n:
        if out and rng.random() < 0.5:
            i = rng.randrange(len(out))
            out.extend(out[i:i + rng.randrange(1, 8)])
        else:
            out.append(rng.randrange(vocab))
    return out[:n]


# ---- the trie -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native", IMPLS)
def test_counts_equal_brute_force_and_invariants_hold_after_appends_and_removals(native):
    rng = random.Random(0)
    trie = SuffixTrie(max_depth=5, native=native)
    live: list[list[int]] = []
    for step in range(60):
        if live and rng.random() < 0.35:
            trie.remove(live.pop(rng.randrange(len(live))))
        else:
            s = random_stream(rng, rng.randrange(1, 30), vocab=4)
            trie.insert(s)
            live.append(s)
        trie.check()
        for _ in range(5):  # every stored string's count is its number of occurrences, nothing else is stored
            s = tuple(rng.randrange(4) for _ in range(rng.randrange(1, 6)))
            node, ok = 0, True
            for t in s:
                node = trie.child(node, t)
                if node < 0:
                    ok = False
                    break
            assert (trie.count[node] if ok else 0) == occurrences(live, s)
    for s in live:
        trie.remove(s)
    trie.check()
    assert trie.num_nodes == 0 and trie.num_dicts == 0 and trie.out[0] == 0


def state(trie: SuffixTrie) -> tuple:
    n = trie.size
    return (trie.token[:n], trie.depth[:n], trie.count[:n], trie.out[:n], trie.best[:n], trie.link[:n], trie.kids,
            trie.free[:trie.nfree], trie.num_nodes, trie.num_dicts)


@pytest.mark.skipif(suffix_tree._native is None, reason="C extension not built")
def test_native_extend_equals_python_appends_through_insertions_and_evictions():
    """The C append loop writes exactly what the Python one does, freed slots reused alike."""
    rng = random.Random(1)
    py, c = SuffixTrie(7, native=False), SuffixTrie(7, native=True)
    live: list[list[int]] = []
    for _ in range(30):
        if live and rng.random() < 0.4:
            s = live.pop(0)
            py.remove(s)
            c.remove(s)
        else:
            s = random_stream(rng, rng.randrange(1, 120), vocab=6)
            live.append(s)
            cursor = 0
            for t in s:                 # one token per call on one side, the whole stream in one call on the other
                cursor = py.extend(cursor, [t])
            assert c.extend(0, s) == cursor
        assert state(py) == state(c)
    long = random_stream(rng, 2500, vocab=40)   # more than one native chunk
    assert py.extend(0, long) == c.extend(0, long)
    assert state(py) == state(c)
    c.check()


@pytest.mark.skipif(suffix_tree._native is None, reason="C extension not built")
@pytest.mark.parametrize("min_prob", [0.0, 0.05, 0.3])
def test_native_drafts_equal_python_drafts(min_prob):
    rng = random.Random(5)
    tries = {flag: SuffixTrie(6, native=flag) for flag in (False, True)}
    for _ in range(12):
        s = random_stream(rng, 80, vocab=5)
        for t in tries.values():
            t.insert(s)
    py, c = tries[False], tries[True]
    for node in range(1, py.size, 7):
        for budget in (1, 4, 12):
            assert py.draft_path(node, budget, min_prob) == c.draft_path(node, budget, min_prob)
            assert py.draft_tree(node, budget, min_prob) == c.draft_tree(node, budget, min_prob)


def test_advance_tracks_the_longest_stored_suffix():
    rng = random.Random(2)
    corpus = [random_stream(rng, 40, vocab=3) for _ in range(3)]
    trie = SuffixTrie(6)
    for s in corpus:
        trie.insert(s)
    trie.check()
    ctx = random_stream(rng, 80, vocab=3)
    m = 0
    for i, t in enumerate(ctx):
        m = trie.advance(m, t)
        longest = max(p for p in range(0, min(i + 1, 6) + 1) if p == 0 or occurrences(corpus, tuple(ctx[i + 1 - p:i + 1])))
        assert trie.depth[m] == longest


# ---- drafts equal the brute-force reference ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["path", "tree"])
def test_drafts_equal_brute_force(mode):
    rng = random.Random(3)
    cfg = SuffixConfig(max_depth=5, max_spec_tokens=6, max_spec_factor=1.5, spec_offset=1.0, min_token_prob=0.05,
                       mode=mode, max_cached_requests=3)
    cache = SuffixCache(cfg)
    cached: list[list[int]] = []
    checked = nonempty = 0
    for rid in range(10):
        stream = random_stream(rng, 45, vocab=4)
        prompt, response = stream[:10], stream[10:]
        cache.start(rid, prompt)
        done = 0
        while done < len(response):
            context = stream[:10 + done]
            got = cache.draft(rid)
            toks, pars, score = ref_draft(context, cached, cfg)
            assert (list(got.tokens), list(got.parents)) == (toks, pars), (rid, done)
            assert got.score == pytest.approx(score)
            checked += 1
            nonempty += bool(toks)
            step = rng.randrange(1, 4)
            cache.extend(rid, response[done:done + step])
            done += step
        cache.finish(rid)
        cached = (cached + [response])[-3:]  # FIFO: the cap keeps the newest three outputs
    assert checked > 100 and nonempty > checked // 2


def test_tree_mode_drafts_alternatives_and_scores_at_least_path_mode():
    seq = [5, 1, 2, 3, 6, 1, 2, 4, 7, 1, 2]  # "1 2" went on as 3 once and as 4 once
    results = {}
    for mode in ("path", "tree"):
        cache = SuffixCache(SuffixConfig(max_depth=4, max_spec_tokens=2, min_token_prob=0.2, mode=mode))
        cache.start(0, seq)
        results[mode] = cache.draft(0)
    path, tree = results["path"], results["tree"]
    assert path.tokens == (3, 6) and path.score == pytest.approx(1.0)  # the tie goes to the smaller token
    assert tree.tokens == (3, 4) and tree.parents == (-1, -1) and tree.score == pytest.approx(1.0)


def test_max_tokens_and_budget_cap_the_draft():
    cache = SuffixCache(SuffixConfig(max_depth=8, max_spec_tokens=5, max_spec_factor=1.0, mode="path"))
    cache.start(0, [5, 6, 7, 8, 9] * 6)
    assert len(cache.draft(0)) == 5
    assert len(cache.draft(0, max_tokens=2)) == 2
    assert cache.draft(0, max_tokens=0) is not None and len(cache.draft(0, max_tokens=0)) == 0


# ---- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("max_depth", -1, "max_depth must be >= 1"),
    ("max_depth", 0, "max_depth must be >= 1"),
    ("max_spec_factor", -0.5, "max_spec_factor must be >= 0.0"),
    ("min_token_prob", 1.5, "min_token_prob must be in [0.0, 1.0]"),
    ("min_token_prob", -0.1, "min_token_prob must be in [0.0, 1.0]"),
    ("max_spec_tokens", -2, "max_spec_tokens must be >= 0"),
    ("max_cached_requests", -1, "max_cached_requests must be >= 0"),
    ("mode", "forest", "mode must be one of path, tree"),
    ("max_depth", 2.5, "max_depth must be an integer"),
    ("min_token_prob", float("nan"), "min_token_prob must be a finite number"),
])
def test_bad_parameters_are_clear_errors(field, value, needle):
    with pytest.raises(GlassboxError, match="suffix speculation: " + needle.replace("[", r"\[").replace("]", r"\]")):
        SuffixConfig(**{field: value})


def test_unknown_config_key_is_named():
    with pytest.raises(GlassboxError, match="max_dpth unknown"):
        SuffixConfig.from_dict({"max_dpth": 3})


# ---- the engine's proposer --------------------------------------------------------------------------------------
def fake_seq(seq_id: int, ids: list[int], prompt_len: int, reason: str | None = None) -> SimpleNamespace:
    """The two fields the proposer reads from a Sequence (a real Sequence needs a model's sampling setup)."""
    return SimpleNamespace(seq_id=seq_id, token_ids=list(ids), prompt_len=prompt_len, finish_reason=reason)


def test_proposer_is_registered_and_frees_trees_of_finished_and_aborted_sequences():
    assert PROPOSERS["suffix"] is SuffixProposer
    prop = make_proposer("suffix")
    a = fake_seq(1, [1, 2, 3, 4, 1, 2], prompt_len=4)
    b = fake_seq(2, [7, 8, 9, 7, 8], prompt_len=3)
    drafts = prop.propose([a, b], max_tokens=4)
    assert isinstance(drafts[0], Draft) and drafts[0].tokens[:2] == (3, 4)
    assert drafts[1].tokens[:1] == (9,)
    assert prop.stats()["active_requests"] == 2
    a.token_ids += [3, 4]                       # the proposer catches up on tokens it has not seen
    prop.propose([a], max_tokens=4)
    assert prop.cache.num_tokens(1) == 8
    a.finish_reason, b.finish_reason = "stop", "abort"
    prop.on_finished(a)
    prop.on_finished(b)
    stats = prop.stats()
    assert stats["active_requests"] == 0 and stats["active_tree_nodes"] == 0
    assert stats["cached_requests"] == 1       # the aborted output does not join the global trie
    assert stats["cached_tokens"] == 4 and stats["tree_nodes"] > 0 and stats["tree_bytes"] > 0
    c = fake_seq(3, [0, 1, 2, 3], prompt_len=1)  # a new request drafts from the finished one's output
    assert prop.propose([c], max_tokens=2)[0].tokens == (4,)
    d = fake_seq(4, [8, 5, 6, 7], prompt_len=1, reason="stop")  # never drafted for, still learnt from
    prop.on_finished(d)
    assert prop.stats()["cached_requests"] == 2
    e = fake_seq(5, [9, 5, 6], prompt_len=1)
    assert prop.propose([e], max_tokens=2)[0].tokens == (7,)


def test_proposer_rebuilds_a_sequence_that_lost_tokens():
    prop = SuffixProposer(SuffixConfig(max_depth=6, mode="path"))
    seq = fake_seq(1, [1, 2, 3, 1, 2], prompt_len=2)
    assert prop.propose([seq], max_tokens=1)[0].tokens == (3,)
    seq.token_ids = [1, 2, 4, 1]                # shorter than what the proposer saw: its trie is rebuilt
    assert prop.propose([seq], max_tokens=1)[0].tokens == (2,)
    seq.token_ids += [2]
    assert prop.propose([seq], max_tokens=1)[0].tokens == (4,)
    assert prop.cache.num_tokens(1) == 5 and prop.stats()["cached_requests"] == 0


def test_global_trie_stays_under_its_cap():
    prop = SuffixProposer(SuffixConfig(max_depth=6, max_cached_requests=4))
    rng = random.Random(4)
    peak = 0
    for sid in range(40):
        seq = fake_seq(sid, random_stream(rng, 60, vocab=50), prompt_len=10, reason="length")
        prop.propose([seq], max_tokens=4)
        prop.on_finished(seq)
        stats = prop.stats()
        assert stats["cached_requests"] <= 4 and stats["cached_tokens"] <= 4 * 50
        peak = max(peak, stats["tree_nodes"])
    assert peak <= 4 * 50 * 6
    prop.cache.global_trie.check()
