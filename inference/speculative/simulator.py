"""Offline SuffixDecoding simulation over token traces: how many tokens per step speculation would give.

A trace is JSONL (optionally gzipped), one request per line: {"prompt": [ids], "response": [ids]}. Requests run
in order. Each step drafts from prompt + response so far, accepts the longest root path of the draft that equals
the true continuation, and emits the accepted tokens plus one (the model's own token at the first mismatch), which
are appended before the next step. A finished response is handed to the speculator's `finish` (for SuffixDecoding:
it joins the global tree). The first `warm` requests only fill the speculator (not measured).

Anything with `start / draft / extend / finish` can be simulated, so other caches (arctic-inference's, in the
benchmark) run under the same rules on the same traces.
"""

from __future__ import annotations

import gzip
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from glassbox.errors import GlassboxError
from glassbox.inference.speculative.draft import Draft
from glassbox.inference.speculative.suffix import SuffixCache, SuffixConfig


class Speculator(Protocol):
    def start(self, req_id: Any, prompt: list[int]) -> None: ...

    def draft(self, req_id: Any, context: list[int]) -> Draft: ...

    def extend(self, req_id: Any, tokens: list[int]) -> None: ...

    def finish(self, req_id: Any) -> None: ...


class GlassboxSpeculator:
    """SuffixCache as a `Speculator` (it tracks each request's context itself, so `context` is unused)."""

    def __init__(self, config: SuffixConfig) -> None:
        self.cache = SuffixCache(config)

    def start(self, req_id: Any, prompt: list[int]) -> None:
        self.cache.start(req_id, prompt)

    def draft(self, req_id: Any, context: list[int]) -> Draft:
        return self.cache.draft(req_id)

    def extend(self, req_id: Any, tokens: list[int]) -> None:
        self.cache.extend(req_id, tokens)

    def finish(self, req_id: Any) -> None:
        self.cache.finish(req_id)


@dataclass
class Request:
    prompt: list[int]
    response: list[int]


def load_traces(path: str | Path) -> list[Request]:
    path = Path(path)
    if not path.is_file():
        raise GlassboxError(f"trace file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, response = row["prompt"], row["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise GlassboxError(f"{path}:{lineno}: not a trace line with 'prompt' and 'response' ({e})")
            for key, ids in (("prompt", prompt), ("response", response)):
                if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise GlassboxError(f"{path}:{lineno}: {key} must be a list of token ids")
            out.append(Request(prompt, response))
    return out


def accepted_length(draft: Draft, truth: list[int]) -> int:
    """Tokens greedy tree verification accepts: the longest root path equal to a prefix of `truth`."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(draft.parents):
        children.setdefault(p, []).append(i)
    node, n = -1, 0
    for tok in truth:
        nxt = next((c for c in children.get(node, ()) if draft.tokens[c] == tok), None)
        if nxt is None:
            break
        node, n = nxt, n + 1
    return n


def simulate(speculator: Speculator, requests: list[Request], warm: int = 0) -> dict[str, float]:
    if warm < 0:
        raise GlassboxError(f"warm must be >= 0, got {warm}")
    steps = emitted = accepted = drafted = 0
    draft_ns: list[int] = []
    extend_ns = start_ns = 0
    extended = started = 0
    clock = time.perf_counter_ns
    for rid, req in enumerate(requests):
        t0 = clock()
        speculator.start(rid, req.prompt)
        if rid >= warm:
            start_ns += clock() - t0
            started += len(req.prompt)
        if rid < warm:
            speculator.extend(rid, req.response)
            speculator.finish(rid)
            continue
        context = list(req.prompt)
        done = 0
        total = len(req.response)
        while done < total:
            t0 = clock()
            draft = speculator.draft(rid, context)
            draft_ns.append(clock() - t0)
            truth = req.response[done:]
            n = accepted_length(draft, truth)
            new = truth[: min(n + 1, len(truth))]
            steps += 1
            drafted += len(draft)
            accepted += n
            emitted += len(new)
            done += len(new)
            context.extend(new)
            t0 = clock()
            speculator.extend(rid, new)
            extend_ns += clock() - t0
            extended += len(new)
        speculator.finish(rid)
    if not steps:
        raise GlassboxError("no measured steps: the traces have no response tokens after the warm-up requests")
    draft_ns.sort()
    return {
        "requests": float(len(requests) - min(warm, len(requests))),
        "steps": float(steps),
        "tokens_per_step": emitted / steps,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "accepted_per_step": accepted / steps,
        "drafted_per_step": drafted / steps,
        "draft_us_median": statistics.median(draft_ns) / 1e3,
        "draft_us_p99": draft_ns[min(len(draft_ns) - 1, int(0.99 * len(draft_ns)))] / 1e3,
        "draft_us_mean": sum(draft_ns) / len(draft_ns) / 1e3,
        "append_us_per_token": extend_ns / max(extended, 1) / 1e3,
        "prompt_us_per_token": start_ns / max(started, 1) / 1e3,
    }
