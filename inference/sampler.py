"""Turns logits into tokens: greedy, temperature, top-k, top-p, per-sequence seeds, logprobs, and verification of
speculative drafts.

Filters run batched over all rows; the random draw runs per row with the sequence's own generator (when it has a
seed), so a seeded request yields the same tokens whatever else shares its batch. Drafts come from model-free
proposers, i.e. a deterministic draft distribution, so verification is the standard speculative rule with a
one-hot draft: accept draft token t with probability p(t), else draw from p with t removed; greedy accepts a draft
token exactly when it is the argmax. Either way the output distribution is the model's own.

Penalties (presence, frequency, repetition) rewrite a sequence's logit rows first. Each row counts the tokens that
precede it: the sequence's output so far plus the draft tokens before that row's position.

A row that still cannot be sampled (values the checks in SamplingParams missed) fails alone: its entry gets the
exception in place of tokens, and the engine fails that request only.
"""

from __future__ import annotations

import torch

from glassbox.inference.sequence import Sequence, TokenLogprob


def apply_penalties(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
    """The logits with each penalized sequence's rows rewritten (a copy; rows of other sequences unchanged)."""
    logits = logits.clone()
    V, dev = logits.shape[-1], logits.device
    r = 0
    for seq, k in rows:
        p = seq.params
        if p.penalized:
            # Counts of the output so far; each later row adds the draft token before it.
            counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long, device=dev), minlength=V)
            counts = counts.to(logits.dtype)
            in_prompt = None
            if p.repetition_penalty != 1:
                in_prompt = torch.zeros(V, dtype=torch.bool, device=dev)
                in_prompt[torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev)] = True
            for j in range(k + 1):
                if j:
                    counts[seq.spec_tokens[j - 1]] += 1
                row = logits[r + j]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
                if in_prompt is not None:
                    scaled = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                    row.copy_(torch.where(in_prompt | (counts > 0), scaled, row))
        r += k + 1
    return logits


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

    def _draw(self, probs: torch.Tensor, seq: Sequence) -> int:
        return int(torch.multinomial(probs, 1, generator=seq.generator or self.generator))

    def sample(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> list[list[int] | Exception]:
        """Tokens for each (sequence, number of draft tokens) entry; logits hold num_drafts + 1 rows per entry.

        Returns each sequence's accepted tokens: the accepted prefix of its draft plus one token sampled from
        the model (the correction, or the bonus token after a fully accepted draft). An entry whose sampling raises
        gets the exception instead, so one request's values cannot fail the others in its batch.
        """
        spans, r = [], 0
        for _, k in rows:
            spans.append((r, r + k + 1))
            r += k + 1
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
        results: list[list[int] | Exception] = []
        for (seq, k), prep in zip(rows, prepared):
            if isinstance(prep, Exception):
                results.append(prep)
                continue
            try:
                results.append(self._accept(seq, k, *prep))
            except Exception as e:
                results.append(e)
        return results

    def _prepare(self, logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> tuple[list[int], torch.Tensor | None]:
        """The batched part of sampling: penalties, then each row's argmax and (unless every row is greedy) its
        filtered probabilities. No random draws, so redoing it changes no generator."""
        if any(seq.params.penalized for seq, _ in rows):
            logits = apply_penalties(logits, rows)
        argmax = logits.argmax(-1).tolist()
        row_seqs = [seq for seq, k in rows for _ in range(k + 1)]
        if all(s.params.greedy for s in row_seqs):
            return argmax, None
        return argmax, self._probs(logits, row_seqs).cpu()

    def _accept(self, seq: Sequence, k: int, argmax: list[int], probs: torch.Tensor | None) -> list[int]:
        """One entry's tokens from its k + 1 rows: verify the draft, then draw (or take the argmax)."""
        draft = seq.spec_tokens[:k]
        accepted: list[int] = []
        for j in range(k + 1):
            if seq.params.greedy:
                tok = argmax[j]
                accepted.append(tok)
                if j == k or tok != draft[j]:
                    break
                continue
            p = probs[j]
            if j < k:
                u = torch.rand((), generator=seq.generator or self.generator)
                if u < p[draft[j]]:
                    accepted.append(draft[j])
                    continue
                p = p.clone()
                p[draft[j]] = 0
                if p.sum() <= 0:
                    accepted.append(draft[j])
                    continue
            accepted.append(self._draw(p, seq))
            break
        return accepted

    @staticmethod
    def logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]],
                 tokens: list[list[int] | Exception]) -> list[list[int] | Exception]:
        """Append each accepted token's logprob (and top alternatives) to the sequences that asked for them.
        Returns `tokens` with any entry whose logprobs raised replaced by the exception, as `sample` does."""
        out = list(tokens)
        r = 0
        for i, ((seq, k), accepted) in enumerate(zip(rows, tokens)):
            if seq.params.logprobs is not None and not isinstance(accepted, Exception):
                try:
                    lp = torch.log_softmax(logits[r:r + len(accepted)].float(), dim=-1).cpu()
                    for j, tok in enumerate(accepted):
                        top = []
                        if seq.params.logprobs > 0:
                            vals, ids = lp[j].topk(seq.params.logprobs)
                            top = list(zip(ids.tolist(), vals.tolist()))
                        seq.logprobs.append(TokenLogprob(tok, float(lp[j, tok]), top))
                except Exception as e:
                    out[i] = e
            r += k + 1
        return out
