"""Turns logits into tokens: greedy, temperature, top-k, top-p, per-sequence seeds, logprobs, and verification of
speculative drafts.

Filters run batched over all rows, and so does the random draw of plain decodes: each row takes one uniform from
its sequence's own generator (when it has a seed), and one inverse-CDF search over the whole batch, on the device,
turns the uniforms into tokens, so a seeded request yields the same tokens whatever else shares its batch. A draw
per row on the host (a multinomial over the vocabulary, after copying every row's probabilities off the device)
cost 1-3 ms a row at a 49k vocabulary, most of a second per step of 256 sampled rows; a uniform costs microseconds.

Drafts are token trees (`Draft`): row 0 of an entry is its last real token, row i + 1 its draft node i. Verification
walks down from the root. Greedy: the child whose token is the row's argmax is accepted, else the argmax is the
model's token and the walk ends. Sampling: drafts come from model-free proposers, a deterministic (one-hot) draft
distribution, so multi-candidate rejection sampling over the children in order (best first) is: accept child
token t with probability p(t) / (mass left), else remove t from p and try the next child; when none is accepted,
draw from what is left. Each token so emitted has exactly the model's probability p, and an accepted child
continues the walk at its own row, so the output distribution is the model's own.

Penalties (presence, frequency, repetition) rewrite a sequence's logit rows first. Each row counts the tokens that
precede it: the sequence's output so far plus the draft tokens on the path from the root to that row's node.

A row that still cannot be sampled (values the checks in SamplingParams missed) fails alone: its entry gets the
exception in place of tokens, and the engine fails that request only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glassbox.errors import GlassboxError
from glassbox.inference.sequence import Sequence, TokenLogprob
from glassbox.inference.speculative.draft import Draft

# One sampled entry: a sequence and the draft it verifies this step (EMPTY for a plain decode); its logits rows
# are 1 + len(draft) consecutive rows.
Entry = tuple[Sequence, Draft]


@dataclass
class Verified:
    """What verification kept of one entry: `tokens` are the accepted draft tokens then the model's own token,
    `path` the accepted nodes, root first (one fewer than the tokens)."""

    tokens: list[int]
    path: list[int]

    def rows(self) -> list[int]:
        """The entry's logits rows that produced each token."""
        return [0] + [node + 1 for node in self.path]


def apply_penalties(logits: torch.Tensor, rows: list[Entry]) -> torch.Tensor:
    """The logits with each penalized sequence's rows rewritten (a copy; rows of other sequences unchanged)."""
    logits = logits.clone()
    V, dev = logits.shape[-1], logits.device
    r = 0
    for seq, draft in rows:
        p = seq.params
        if p.penalized:
            # Counts of the output so far at the root's row; a node's row adds the path's draft tokens.
            counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=dev), minlength=V)
            per_row = [counts.to(logits.dtype)]
            for tok, parent in zip(draft.tokens, draft.parents):
                c = per_row[parent + 1].clone()
                c[tok] += 1
                per_row.append(c)
            in_prompt = None
            if p.repetition_penalty != 1:
                in_prompt = torch.zeros(V, dtype=torch.bool, device=dev)
                in_prompt[torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev)] = True
            for j, c in enumerate(per_row):
                row = logits[r + j]
                row -= p.frequency_penalty * c + p.presence_penalty * (c > 0).to(row.dtype)
                if in_prompt is not None:
                    scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                    row.copy_(torch.where(in_prompt | (c > 0), scaled, row))
        r += len(draft) + 1
    return logits


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i's token: the first whose cumulative mass exceeds u[i] x the row's mass (rows [R, V] need not sum to
    1; u [R] uniforms in [0, 1)), which draws it with its probability. Returns the tokens [R] and each row's mass
    (not finite or 0: the row cannot be sampled). A token of zero mass is never returned: where rounding in the
    parallel scan would pick one (at most an ulp of float64 wide), the row's most likely token is taken instead."""
    cdf = probs.double().cumsum(-1)
    mass = cdf[:, -1]
    tokens = torch.searchsorted(cdf, (u.to(cdf.dtype) * mass)[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    kept = probs.gather(1, tokens) > 0
    return torch.where(kept, tokens, probs.argmax(-1, keepdim=True))[:, 0], mass


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows of logits [R, V] -> filtered probabilities, each row under its sequence's settings."""
        dev = logits.device
        temps = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], device=dev)
        logits = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        top_ps = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_ks) or any(p < 1 for p in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            V = logits.shape[-1]
            ks = torch.tensor([k if k > 0 else V for k in top_ks], device=dev)
            drop = torch.arange(V, device=dev)[None, :] >= ks[:, None]
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it already does.
            before = probs.cumsum(-1) - probs
            drop |= before >= torch.tensor(top_ps, device=dev)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return logits.softmax(-1)

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One uniform in [0, 1) per sequence (float64, on the host): from its own generator when it has a seed,
        else from the engine's, drawn for all such rows at once."""
        shared = [i for i, s in enumerate(seqs) if s.generator is None]
        common = torch.rand(len(shared), generator=self.generator, dtype=torch.float64).tolist() if shared else []
        u = [0.0] * len(seqs)
        for i, value in zip(shared, common):
            u[i] = value
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = s.generator.random()
        return torch.tensor(u, dtype=torch.float64)

    def _draw_rows(self, probs: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """A token for row i of `probs` [R, V] (on any device) under `seqs[i]`'s generator, in one batched search
        and one transfer; a row that cannot be sampled (mass not finite or zero) gets an exception instead."""
        tokens, mass = inverse_cdf(probs, self._uniforms(seqs).to(probs.device))
        drawn = torch.stack([tokens.double(), mass]).cpu().tolist()
        return [int(t) if math.isfinite(m) and m > 0
                else GlassboxError(f"request {s.request_id}: its filtered probability mass is {m}: nothing to sample")
                for t, m, s in zip(*drawn, seqs)]

    def _draw(self, probs: torch.Tensor, seq: Sequence) -> int:
        token = self._draw_rows(probs[None], [seq])[0]
        if isinstance(token, Exception):
            raise token
        return token

    def sample(self, logits: torch.Tensor, rows: list[Entry]) -> list[Verified | Exception]:
        """What each (sequence, draft) entry keeps; logits hold 1 + len(draft) rows per entry.

        Returns each sequence's accepted root path of its draft plus one token sampled from the model (the
        correction, or the bonus token after a leaf). An entry whose sampling raises gets the exception instead, so
        one request's values cannot fail the others in its batch.
        """
        spans, r = [], 0
        for _, draft in rows:
            spans.append((r, r + len(draft) + 1))
            r += len(draft) + 1
        prepared: list[tuple[list[int], torch.Tensor | None] | Exception]
        try:
            argmax, probs = self._prepare(logits, rows)
            prepared = [(argmax[a:b], None if probs is None else probs[a:b]) for a, b in spans]
        except Exception:
            # Some entry breaks the batched filters: redo them one entry at a time to confine the failure to it.
            prepared = []
            for row, (a, b) in zip(rows, spans):
                try:
                    prepared.append(self._prepare(logits[a:b], [row]))
                except Exception as e:
                    prepared.append(e)
        results: list[Verified | Exception | None] = [None] * len(rows)
        plain: list[int] = []                # sampled entries without a draft: drawn together below
        walked: list[int] = []               # greedy entries, and drafts whose tree is walked on the host
        for i, ((seq, draft), prep) in enumerate(zip(rows, prepared)):
            if isinstance(prep, Exception):
                results[i] = prep
            elif not draft and not seq.params.greedy:
                plain.append(i)
            else:
                walked.append(i)
        # Sampled drafts' rows come to the host in one copy (rejection sampling reads them row by row).
        sampled = [i for i in walked if not rows[i][0].params.greedy]
        host: dict[int, torch.Tensor | Exception] = {}
        if sampled:
            try:
                copied = torch.cat([prepared[i][1] for i in sampled]).cpu()
                host = dict(zip(sampled, copied.split([len(rows[i][1]) + 1 for i in sampled])))
            except Exception as e:
                host = dict.fromkeys(sampled, e)
        for i in walked:
            seq, draft = rows[i]
            try:
                probs_rows = host.get(i)
                if isinstance(probs_rows, Exception):
                    raise probs_rows
                results[i] = self._accept(seq, draft, prepared[i][0], probs_rows)
            except Exception as e:
                results[i] = e
        if plain:
            try:
                drawn = self._draw_rows(torch.cat([prepared[i][1] for i in plain]), [rows[i][0] for i in plain])
            except Exception as e:
                drawn = [e] * len(plain)
            for i, token in zip(plain, drawn):
                results[i] = token if isinstance(token, Exception) else Verified([token], [])
        return results

    def _prepare(self, logits: torch.Tensor, rows: list[Entry]) -> tuple[list[int], torch.Tensor | None]:
        """The batched part of sampling: penalties, then each row's argmax and (unless every row is greedy) its
        filtered probabilities, left on the logits' device. No random draws, so redoing it changes no generator."""
        if any(seq.params.penalized for seq, _ in rows):
            logits = apply_penalties(logits, rows)
        argmax = logits.argmax(-1).tolist()
        row_seqs = [seq for seq, draft in rows for _ in range(len(draft) + 1)]
        if all(s.params.greedy for s in row_seqs):
            return argmax, None
        return argmax, self._probs(logits, row_seqs)

    def _accept(self, seq: Sequence, draft: Draft, argmax: list[int], probs: torch.Tensor | None) -> Verified:
        """One entry's tokens from its rows: walk the draft tree from the root, then draw (or take the argmax)."""
        tokens: list[int] = []
        path: list[int] = []
        node = -1
        while True:
            row, kids = node + 1, draft.children(node)
            if seq.params.greedy:
                tok = argmax[row]
                nxt = next((c for c in kids if draft.tokens[c] == tok), None)
            else:
                tok, nxt = self._verify_children(seq, draft, kids, probs[row])
            tokens.append(tok)
            if nxt is None:
                return Verified(tokens, path)
            path.append(nxt)
            node = nxt

    def _verify_children(self, seq: Sequence, draft: Draft, kids: tuple[int, ...], p: torch.Tensor
                         ) -> tuple[int, int | None]:
        """Multi-candidate rejection sampling with one-hot drafts: the token emitted at this node, and the child
        accepted (None when the token is drawn from the residual)."""
        for c in kids:
            t = draft.tokens[c]
            mass = p.sum()
            u = seq.generator.random() if seq.generator is not None else torch.rand((), generator=self.generator)
            if u * mass < p[t]:
                return t, c
            p = p.clone()
            p[t] = 0
            if p.sum() <= 0:          # t held all the mass left (rounding kept it from being drawn above)
                return t, c
        return self._draw(p, seq), None

    @staticmethod
    def logprobs(logits: torch.Tensor, rows: list[Entry],
                 results: list[Verified | Exception]) -> list[Verified | Exception]:
        """Append each accepted token's logprob (and top alternatives) to the sequences that asked for them, from
        the row that produced it. Returns `results` with any entry whose logprobs raised replaced by the
        exception, as `sample` does."""
        out = list(results)
        r = 0
        for i, ((seq, draft), verified) in enumerate(zip(rows, results)):
            if seq.params.logprobs is not None and not isinstance(verified, Exception):
                try:
                    picked = torch.tensor([r + j for j in verified.rows()], device=logits.device)
                    lp = torch.log_softmax(logits[picked].float(), dim=-1).cpu()
                    for j, tok in enumerate(verified.tokens):
                        top = []
                        if seq.params.logprobs > 0:
                            vals, ids = lp[j].topk(seq.params.logprobs)
                            top = list(zip(ids.tolist(), vals.tolist()))
                        seq.logprobs.append(TokenLogprob(tok, float(lp[j, tok]), top))
                except Exception as e:
                    out[i] = e
            r += len(draft) + 1
        return out
