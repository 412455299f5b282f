"""Runs glassbox's Transformer over a flat batch of tokens from many sequences, with a paged KV cache.

The weights and the math of every block (norms, rotary, projections, SwiGLU / MoE) are the training model's own
modules; only attention differs: each token's K and V are written into its cache slot (block id x block size +
offset), and queries attend over their sequence's blocks gathered through its block table. Decoding tokens (one
query per sequence) are batched into one SDPA call with a padding mask; prefill chunks and speculative
verification (several queries per sequence) run per sequence with a causal mask offset by the cached context.
Logits are computed only at the positions that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glassbox.inference.block_manager import BlockManager
from glassbox.inference.scheduler import SchedulerOutput
from glassbox.train.model import Attention, Transformer, apply_rotary


@dataclass
class PrefillSpan:
    """A sequence with several query tokens this step: rows [row, row + n) of the flat batch, at positions
    [start, start + n); `table` holds its blocks when it attends to KV computed in earlier steps."""

    row: int
    n: int
    start: int
    table: torch.Tensor | None


@dataclass
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logit_rows: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSpan]
    all_decode: bool


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * block_size


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.num_layers)]

    def prepare(self, batch: SchedulerOutput, blocks: BlockManager) -> BatchInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        bs = self.block_size
        for s in batch.scheduled:
            row = len(ids)
            ids.extend(s.input_ids())
            pos = range(s.start, s.start + s.num_tokens)
            positions.extend(pos)
            table = s.seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if s.samples:
                logit_rows.extend(range(row + s.num_tokens - s.num_spec - 1, row + s.num_tokens))
            if s.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(table[:blocks.blocks_needed(s.start + 1)])
                decode_lens.append(s.start + 1)
            else:
                ctx_table = None
                if s.start > 0:
                    ctx_table = torch.tensor(table[:blocks.blocks_needed(s.start + s.num_tokens)], device=self.device)
                prefills.append(PrefillSpan(row, s.num_tokens, s.start, ctx_table))
        dev = self.device
        inputs = BatchInputs(
            input_ids=torch.tensor(ids, device=dev),
            positions=torch.tensor(positions, device=dev),
            slots=torch.tensor(slots, device=dev),
            logit_rows=torch.tensor(logit_rows, device=dev),
            decode_rows=None, decode_tables=None, decode_mask=None,
            prefills=prefills,
            all_decode=not prefills,
        )
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            inputs.decode_rows = torch.tensor(decode_rows, device=dev)
            inputs.decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=dev)
            lens = torch.tensor(decode_lens, device=dev)
            inputs.decode_mask = (torch.arange(width * bs, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        return inputs

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, blocks: BlockManager) -> torch.Tensor:
        """Compute the batch's KV into the cache and return fp32 logits at its sampling positions, in order."""
        inputs = self.prepare(batch, blocks)
        m = self.model
        x = m.embed_tokens(inputs.input_ids)
        cos, sin = m.rotary(inputs.positions, x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, layer in enumerate(m.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(layer.self_attn, h, cos, sin, i, inputs)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if inputs.logit_rows.numel() == 0:
            return torch.empty(0, m.config.vocab_size, device=self.device)
        return m.lm_head(m.norm(x[inputs.logit_rows])).float()

    def _attention(self, attn: Attention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                   inputs: BatchInputs) -> torch.Tensor:
        N, hd = h.shape[0], attn.head_dim
        q = apply_rotary(attn.q_proj(h).view(N, -1, hd), cos, sin)
        k = apply_rotary(attn.k_proj(h).view(N, -1, hd), cos, sin)
        v = attn.v_proj(h).view(N, -1, hd)
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc.index_copy_(0, inputs.slots, k)
        vc.index_copy_(0, inputs.slots, v)
        if inputs.all_decode:
            return attn.o_proj(self._decode_attention(q, kc, vc, inputs).reshape(N, -1))
        out = torch.empty_like(q)
        if inputs.decode_rows is not None:
            out[inputs.decode_rows] = self._decode_attention(q[inputs.decode_rows], kc, vc, inputs)
        for span in inputs.prefills:
            qs = q[span.row:span.row + span.n].transpose(0, 1)[None]
            if span.table is None:
                ks = k[span.row:span.row + span.n].transpose(0, 1)[None]
                vs = v[span.row:span.row + span.n].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                ctx = span.start + span.n
                ks = self._gather(kc, span.table[None])[:, :, :ctx]
                vs = self._gather(vc, span.table[None])[:, :, :ctx]
                qpos = torch.arange(span.start, ctx, device=h.device)
                mask = torch.arange(ctx, device=h.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[span.row:span.row + span.n] = o[0].transpose(0, 1)
        return attn.o_proj(out.reshape(N, -1))

    def _gather(self, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """[B, blocks] block tables -> [B, kv_heads, blocks x block_size, head_dim] keys or values."""
        B, nb = tables.shape
        blocks = cache.view(self.num_blocks, self.block_size, *cache.shape[1:])[tables]
        return blocks.view(B, nb * self.block_size, *cache.shape[1:]).transpose(1, 2)

    def _decode_attention(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                          inputs: BatchInputs) -> torch.Tensor:
        ks = self._gather(kc, inputs.decode_tables)
        vs = self._gather(vc, inputs.decode_tables)
        o = F.scaled_dot_product_attention(q[:, :, None, :], ks, vs, attn_mask=inputs.decode_mask, enable_gqa=True)
        return o[:, :, 0, :]
