"""Runs glassbox's Transformer over a flat batch of tokens from many sequences, with a paged KV cache.

The weights and the math of every block (norms, rotary, projections, SwiGLU / MoE) are the training model's own
modules; only attention differs: each token's K and V are written into its cache slot (block id x block size +
offset), and queries attend over their sequence's blocks gathered through its block table. Decoding tokens (one
query per sequence) are batched into one SDPA call with a padding mask. A step with prompts in it (fresh, later
prefill chunks, prefix-cache hits, beside decodes) packs every sequence into one varlen attention call where the
runner has the kernel (glassbox.inference.attention: FlashAttention's varlen on CUDA in bf16 / fp16): no mask, no
repeated K/V heads, no padding. Elsewhere, and for speculative draft trees, sequences with several query tokens
are padded into one more SDPA call, each query seeing its sequence's cached keys up to its own position (a dense
mask); fresh prompts of one length skip the cache and the mask (is_causal). Logits are computed only at the
positions that sample.

On CUDA, batches of pure decodes replay CUDA graphs captured at padded batch sizes (1, 2, 4, 8, then every 16),
which removes the per-kernel launch cost that dominates decoding small models. Padding rows write into a scratch
block past the pool and are dropped. MoE models run eagerly: their routing reads expert counts on the host.
With `compile`, the decoder layer (one plain function for all layers) is compiled by `torch.compile`: at each
captured size, so each graph replays Inductor's fused kernels instead of the ~45 eager kernels per layer, and with
dynamic shapes for eager batches, whose every structure is compiled at start-up on synthetic batches. Steps with
prompts run as piecewise graphs where the runner has them (glassbox.inference.piecewise: the layer stack cut at
attention, captured per padded token count); their pieces are what `compile` then compiles, and the eager path,
a rare fallback, stays uncompiled.

A SwiftKV model (glassbox.models.swiftkv) runs layers < l for every token, then writes the KV of every layer >= l
from norm(h_l) in one matmul, and runs layers >= l only for the rows that need logits (a second, smaller batch
whose queries attend to the cache). Its AcrossKV groups share one cache (`cache_of_layer`), so a pool of the same
bytes holds more tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from glassbox.errors import GlassboxError
from glassbox.inference.attention import VarlenBatch, cache_slots, choose_kernel, pack, varlen_attend
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.piecewise import PiecewiseGraphs
from glassbox.inference.scheduler import SchedulerOutput
from glassbox.inference.speculative.draft import EMPTY, Draft
from glassbox.inference.tensor_parallel import local_kv_heads
from glassbox.models.swiftkv import SwiftKVTransformer
from glassbox.models.transformer import Attention, Block, Transformer, apply_rotary, join_rows


class Span(NamedTuple):
    """A sequence's query tokens this step (one for a decode): rows [row, row + n) of the flat batch, whose KV
    goes to the slots of positions [start, start + n), its context's blocks in `table`. With a draft, its last
    `len(draft)` rows are the draft's nodes: each sees the real tokens and its own ancestors only."""

    row: int
    n: int
    start: int
    table: list[int]
    draft: Draft = EMPTY


def tree_visibility(draft: Draft) -> list[list[bool]]:
    """Which nodes each node of `draft` attends to: itself and its ancestors (row i, column j: node j is node i
    or above it)."""
    seen: list[list[bool]] = []
    for i, p in enumerate(draft.parents):
        row = list(seen[p]) if p >= 0 else [False] * len(draft)
        row[i] = True
        seen.append(row)
    return seen


@dataclass
class SpanBatch:
    """Sequences with several query tokens this step (prompts, later prefill chunks, prefix-cache hits,
    speculative verification), attended in one SDPA call.

    `rows` [G, Lq] are the query rows in the flat batch (a shorter sequence repeats its last row). With `causal`,
    every sequence is a fresh prompt of the same length, so its keys are exactly its rows and is_causal applies.
    Otherwise keys come from the cache through block `tables` [G, blocks], `mask` [G, 1, Lq, Lk] lets each query
    see its sequence up to its own position, and the real queries (flat positions `valid`) go back to `out_rows`.
    Integer indices, not boolean masks, so that no step needs a data-dependent shape (compilable)."""

    rows: torch.Tensor
    causal: bool
    tables: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None       # positions of the real queries in the flattened [G x Lq] batch
    out_rows: torch.Tensor | None = None


@dataclass
class BatchInputs:
    """A flat batch. Decodes ride in one group: `decode_lens` [B] context lengths through the last token,
    `decode_tables` [B, blocks]. A captured verification graph makes that group a tree group: every sequence has
    T rows (its last token, then its draft's nodes, then padding), and `tree` [B, T, T] says which of its rows
    each row sees (row 0, the last token, is seen by all), so that key positions past the last token are visible
    only along the row's own branch."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logit_rows: torch.Tensor | None          # None: every row, in order
    decode_rows: torch.Tensor | None         # None with decode_lens set: every row is a decode
    decode_tables: torch.Tensor | None
    decode_lens: torch.Tensor | None
    spans: list[SpanBatch]
    tree: torch.Tensor | None = None
    # SwiftKV: the rows that run the layers >= l (those that need logits), as their own batch whose queries
    # attend to the cache; `upper_rows` [U] picks them from this batch. None: every row (pure decodes, graphs).
    upper: BatchInputs | None = None
    upper_rows: torch.Tensor | None = None
    # The sequences attended by the varlen kernel (a runner that has one, a step with a prompt in it): decodes
    # and every multi-token sequence but draft trees, which stay in `spans`.
    varlen: VarlenBatch | None = None


# A span batch's mask holds at most this many elements (SDPA may expand it to a float bias per head);
# sequences beyond it go into further batches.
SPAN_MASK_LIMIT = 1 << 20


# Attention kernels for eager batches, whose shapes change every step (prompt lengths, decode counts, table
# widths). cuDNN attention is left out: it builds a plan for every new shape, which on the H100 made steps with
# fresh prompts of many lengths take up to a second. Captured graphs have fixed shapes and keep torch's choice.
EAGER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Compiles of the decoder layer that the runners of this process may need (see ModelRunner.__init__), and the
# most batch structures one runner's eager path is expected to meet (spans causal or not, one batch or several,
# with decodes or without, dims of size 1 specialised).
_compiles_allowed = 8
EAGER_STRUCTURES = 24
# Compiles one runner's pieces may need per code object (glassbox.inference.piecewise): a layer piece with a next
# layer, with its SwiftKV query projection and without a next layer, each possibly specialised at one row.
PIECE_KINDS = 8


def cache_of_layer(model: Transformer) -> list[int]:
    """Layer -> the KV cache it reads and writes: its own, except SwiftKV's AcrossKV groups, which share one."""
    L = model.config.num_layers
    if isinstance(model, SwiftKVTransformer):
        return model.swiftkv.cache_of_layer(L)
    return list(range(L))


def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    caches = max(cache_of_layer(model)) + 1
    per_token = 2 * caches * local_kv_heads(model) * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * block_size


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def decoder_layer(layer: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                  vc: torch.Tensor, inputs: BatchInputs, decode_mask: torch.Tensor | None,
                  block_size: int) -> torch.Tensor:
    """One decoder layer over a flat batch with a paged KV cache. Its cache is passed in (not indexed by layer
    number) and it is a plain function (not a runner method), so every layer of every runner runs the same
    compiled code, and compiled code holds no runner (nor its KV pool) alive. The block itself is the training
    model's `Block.forward`; only its attention is replaced."""

    def attention(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return paged_attention(layer.self_attn, h, cos, sin, kc, vc, inputs, decode_mask, block_size)

    return layer(x, cos, sin, attention=attention)


def upper_decoder_layer(layer: Block, q_proj: torch.nn.Linear, x: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, inputs: BatchInputs,
                        decode_mask: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """A SwiftKV layer >= l over the rows that need logits: its KV is in the cache already (written in bulk from
    norm(h_l)), so it only computes queries, with its SwiftKV query projection, and attends."""

    def attention(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, hd = h.shape[0], layer.self_attn.head_dim
        q = apply_rotary(q_proj(h).view(N, -1, hd), cos[:, None, :], sin[:, None, :])
        return layer.self_attn.o_proj(attend(q, None, None, kc, vc, inputs, decode_mask, block_size).reshape(N, -1))

    return layer(x, cos, sin, attention=attention)


def paged_attention(attn: Attention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor,
                    vc: torch.Tensor, inputs: BatchInputs, decode_mask: torch.Tensor | None,
                    block_size: int) -> torch.Tensor:
    N, hd = h.shape[0], attn.head_dim
    cos, sin = cos[:, None, :], sin[:, None, :]
    q, k, v = (t.view(N, -1, hd) for t in attn.project_qkv(h))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    kc.index_copy_(0, inputs.slots, k)
    vc.index_copy_(0, inputs.slots, v)
    return attn.o_proj(attend(q, k, v, kc, vc, inputs, decode_mask, block_size).reshape(N, -1))


def attend(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, kc: torch.Tensor, vc: torch.Tensor,
           inputs: BatchInputs, decode_mask: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Attention of the batch's queries q [N, heads, head_dim] over the cache, whose KV for this batch's tokens
    is written already; causal span batches (fresh prompts) use this batch's own keys `k`, `v` instead."""
    packed = inputs.varlen
    if packed is not None and packed.rows is None:               # every row in the varlen batch
        return varlen_attend(q, kc, vc, packed)
    if not inputs.spans:
        return decode_attention(q, kc, vc, inputs.decode_tables, decode_mask, block_size)
    out = torch.empty_like(q)
    if packed is not None:
        out[packed.rows] = varlen_attend(q[packed.rows], kc, vc, packed)
    if inputs.decode_rows is not None:
        out[inputs.decode_rows] = decode_attention(q[inputs.decode_rows], kc, vc, inputs.decode_tables, decode_mask,
                                                   block_size)
    for b in inputs.spans:
        qs = q[b.rows].transpose(1, 2)                                   # [G, heads, Lq, head_dim]
        if b.causal:
            o = F.scaled_dot_product_attention(qs, k[b.rows].transpose(1, 2), v[b.rows].transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
            out[b.rows] = o.transpose(1, 2)
        else:
            # K/V heads repeated to the query heads: with a mask and grouped heads, SDPA falls back to its
            # unfused math kernel; with equal heads the fused memory-efficient kernel takes the mask.
            groups = qs.shape[1] // kc.shape[1]
            ks = gather_blocks(kc, b.tables, block_size).repeat_interleave(groups, dim=1)
            vs = gather_blocks(vc, b.tables, block_size).repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=b.mask[:, None]).transpose(1, 2)
            out[b.out_rows] = o.reshape(-1, *o.shape[2:])[b.valid]
    return out


def gather_blocks(cache: torch.Tensor, tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, blocks] block tables -> [B, kv_heads, blocks x block_size, head_dim] keys or values."""
    B, nb = tables.shape
    blocks = cache.view(-1, block_size, *cache.shape[1:])[tables]
    return blocks.view(B, nb * block_size, *cache.shape[1:]).transpose(1, 2)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, tables: torch.Tensor, mask: torch.Tensor,
                     block_size: int) -> torch.Tensor:
    """q [B, heads, head_dim] and mask [B, keys] for decodes; q [B x T, heads, head_dim] and mask [B, T, keys]
    for a tree group (T rows per sequence)."""
    ks = gather_blocks(kc, tables, block_size)
    vs = gather_blocks(vc, tables, block_size)
    if mask.dim() == 2:
        o = F.scaled_dot_product_attention(q[:, :, None, :], ks, vs, attn_mask=mask[:, None, None], enable_gqa=True)
        return o[:, :, 0, :]
    B, T = mask.shape[:2]
    qs = q.view(B, T, *q.shape[1:]).transpose(1, 2).contiguous()          # [B, heads, T, head_dim]
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask[:, None], enable_gqa=True)
    return o.transpose(1, 2).reshape(q.shape)


def group_mask(inputs: BatchInputs, block_size: int) -> torch.Tensor:
    """[B, keys] for the decode group: every key through the last token; [B, T, keys] for a tree group: a key
    before the last token is seen by every row, the last token's and the draft's slots (from the last token's
    position on) where `tree` says."""
    lens = inputs.decode_lens
    keys = torch.arange(inputs.decode_tables.shape[1] * block_size, device=lens.device)
    if inputs.tree is None:
        return keys[None, :] < lens[:, None]
    B, T = inputs.tree.shape[:2]
    rel = keys[None, :] - (lens - 1)[:, None]                              # [B, keys]: key - last token's slot
    seen = inputs.tree.bool().gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, -1))
    return (rel < 0)[:, None, :] | (seen & (rel < T)[:, None, :])


def _dynamic_shapes():
    """How the eager path's dynamic shapes are traced: sizes that happen to be equal in one batch (a span's table
    width and the decodes') stay separate symbols, and a size of 1 is not specialised (one prompt, one decode),
    so that a batch structure compiles once, whatever its sizes."""
    return torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, cuda_graphs: bool = True, compile: bool = False,
                 tree_rows: dict[int, int] | None = None, attention: str = "auto",
                 piecewise: list[int] | None = None, graph_compile: str = "per_size"):
        """`tree_rows` maps graph batch sizes to the rows per sequence of their verification graphs (the last
        token plus the most draft nodes a sequence gets at that size); None or empty: no verification graphs.
        `attention` picks the kernel of eager steps with prompts in them (glassbox.inference.attention): `auto`
        the varlen flash kernel where it runs and passes its check (CUDA, bf16 / fp16), else the dense masked
        path; `dense`, `varlen` (flash or an error) or `reference` (the varlen layout in plain torch) to insist.
        `piecewise`: token counts at which steps the decode graphs do not take run as piecewise graphs
        (glassbox.inference.piecewise; captured on CUDA, run uncaptured elsewhere); None: those steps run eagerly.
        `graph_compile`: with `compile`, the decode graphs' layer compiled per captured size (`per_size`) or once
        for a symbolic batch size (`dynamic`; EngineConfig.graph_compile)."""
        self._args = dict(model=model, num_blocks=num_blocks, block_size=block_size, max_model_len=max_model_len,
                          max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs, compile=compile, tree_rows=tree_rows,
                          attention=attention, piecewise=piecewise, graph_compile=graph_compile)
        self.model = model.eval()
        cfg = model.config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        attn = model.layers[0].self_attn
        self.varlen = choose_kernel(attention, self.device, self.dtype, attn.q_proj.out_features // cfg.head_dim,
                                    local_kv_heads(model), cfg.head_dim)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and not cfg.is_moe
        if compile and cfg.is_moe:
            raise GlassboxError("engine option compile: MoE routing reads expert counts on the host, which a compiled "
                                "layer cannot; serve MoE models without compile")
        self.compile = compile
        self.graph_compile = graph_compile
        # Eager batches (prefills, mixed steps, decodes beyond the graphs) run the layer compiled for dynamic
        # shapes: one compile per batch structure (prompts alone or beside decodes, of one length or several),
        # not per size. Dynamo counts compiles per code object over the whole process, so its limit grows with
        # every runner's graphs and structures; it is only ever raised. With piecewise graphs, which take every
        # step up to the token budget, the eager path is a rare fallback (a step past the budget, more sampling
        # rows than the graphs hold) and stays uncompiled: start-up compiles only the pieces and the decode graphs.
        self._eager_block: Callable = decoder_layer
        self._eager_upper: Callable = upper_decoder_layer
        if compile:
            global _compiles_allowed
            graphs = len(graph_batch_sizes(max_num_seqs)) + len(tree_rows or {}) if self.use_graphs else 0
            _compiles_allowed += (PIECE_KINDS if piecewise else EAGER_STRUCTURES) + graphs
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _compiles_allowed)
        if compile and not piecewise:
            # Not fullgraph: a structure nobody foresaw must run (split, or eagerly past the limit), never fail.
            self._eager_block = torch.compile(decoder_layer, dynamic=True)
            self._eager_upper = torch.compile(upper_decoder_layer, dynamic=True)
        # One scratch block past the pool takes the writes of graph padding rows and of compile warm-ups.
        self.scratch = num_blocks
        shape = ((num_blocks + 1) * block_size, local_kv_heads(model), cfg.head_dim)   # this rank's heads
        # One cache per layer, except that the layers of a SwiftKV AcrossKV group share theirs.
        self.cache_of_layer = cache_of_layer(model)
        caches = max(self.cache_of_layer) + 1
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(caches)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(caches)]
        self.swiftkv = SwiftKVPath(model) if isinstance(model, SwiftKVTransformer) else None
        if self.swiftkv is not None and local_kv_heads(model) != cfg.num_kv_heads:
            raise GlassboxError("SwiftKV models are served without tensor parallelism (their K/V projections for "
                                "the upper layers are not sharded): set tensor_parallel_size 1")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.tree_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._tree_inputs: GraphInputs | None = None
        self._move: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None = None
        self._move_max = 0
        # Before the decode graphs' capture: a SwiftKV step reads upper_pieces (None there: the graphs hold it all).
        self.piecewise: PiecewiseGraphs | None = None
        self.upper_pieces: PiecewiseGraphs | None = None     # SwiftKV's layers >= l over the sampling rows
        if self.use_graphs:
            self._capture(graph_batch_sizes(max_num_seqs), -(-max_model_len // block_size), dict(tree_rows or {}))
            if tree_rows:
                self._capture_move(max(b * (t - 1) for b, t in tree_rows.items()))
        if piecewise:
            if local_kv_heads(model) != cfg.num_kv_heads:
                raise GlassboxError("piecewise graphs: a tensor-parallel shard's all-reduces are not captured yet; "
                                    "serve it without piecewise_graphs")
            capture = cuda_graphs and self.device.type == "cuda"
            if self.swiftkv is None:
                self.piecewise = PiecewiseGraphs(model, piecewise, capture, compile)
            else:
                l, L = self.swiftkv.layer, cfg.num_layers
                self.piecewise = PiecewiseGraphs(model, piecewise, capture, compile, layers=(0, l))
                if l < L:     # the rows that sample, as many as the decode graphs take
                    self.upper_pieces = PiecewiseGraphs(model, graph_batch_sizes(max_num_seqs), capture, compile,
                                                        layers=(l, L), q_projs=self.swiftkv.q_proj)
        if compile and not piecewise:
            self._compile_eager_structures()

    def replaced(self, **changes) -> ModelRunner:
        """A runner built as this one was, with `changes` to its arguments (benches and tests compare attention
        paths inside one engine: `engine.runner = engine.runner.replaced(attention="dense")`). This runner's KV
        pool and graphs are released first, so both never hold memory together; what its cache held is lost."""
        self.k_cache, self.v_cache = [], []
        self.graphs, self.tree_graphs, self._move, self.piecewise, self.upper_pieces = {}, {}, None, None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return ModelRunner(**{**self._args, **changes})

    # Inputs ----------------------------------------------------------------------------------------------------

    def prepare(self, batch: SchedulerOutput, blocks: BlockManager) -> BatchInputs:
        """The step's inputs. Per sequence, Python gathers its tokens, block table and row; every per-token index
        (positions, cache slots, varlen key slots) is then computed with a few torch ops on the host."""
        ids: list[int] = []
        logit_rows: list[int] = []
        seqs: list[Span] = []
        for s in batch.scheduled:
            row = len(ids)
            ids += s.input_ids()
            if s.samples:
                logit_rows.extend(range(row + s.num_tokens - s.num_spec - 1, row + s.num_tokens))
            seqs.append(Span(row, s.num_tokens, s.start,
                             s.seq.block_table[:blocks.blocks_needed(s.start + s.num_tokens)], s.draft))
        ids_t = torch.tensor(ids, dtype=torch.long)
        positions, slots = self._token_layout(seqs, len(ids))
        varlen = self._uses_varlen(seqs)
        inputs = self._inputs(ids_t, positions, slots, logit_rows, seqs, varlen)
        if self.swiftkv is not None and inputs.logit_rows is not None:
            self._add_upper(inputs, batch, seqs, ids_t, positions, slots, logit_rows, varlen)
        return inputs

    def _uses_varlen(self, seqs: list[Span]) -> bool:
        """Whether a step's sequences go to the varlen kernel: the runner has one and some sequence has several
        query tokens and no draft (a step of pure decodes runs the decode path, as its graphs do)."""
        return self.varlen is not None and any(sp.n > 1 and not sp.draft for sp in seqs)

    def _token_layout(self, seqs: list[Span], total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary positions and cache slots of every row (host tensors). A sequence's row r writes its KV at the
        slot of position start + r; its rotary position is the same, except that a draft node sits at the last
        real token's position plus its depth (where it will be if accepted)."""
        seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([sp.n for sp in seqs], dtype=torch.long),
                                      output_size=total)
        offset = torch.tensor([sp.start - sp.row for sp in seqs], dtype=torch.long)
        at = torch.arange(total) + offset[seq]
        slots = cache_slots([sp.table for sp in seqs], seq, at, self.block_size)
        positions = at
        for sp in seqs:
            if sp.draft:
                m = len(sp.draft)
                last = sp.start + sp.n - m - 1
                positions[sp.row + sp.n - m:sp.row + sp.n] = last + torch.tensor(sp.draft.depths, dtype=torch.long)
        return positions, slots

    def _add_upper(self, inputs: BatchInputs, batch: SchedulerOutput, seqs: list[Span], ids: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, logit_rows: list[int], varlen: bool) -> None:
        """SwiftKV: the batch of the rows that run layers >= l, the sampling rows in order. A sequence's last real
        token attends like a decode (to its context through its own position); with a draft, the last token and
        the draft's nodes form a span that starts at the last token, its nodes seeing their ancestors only."""
        upper: list[Span] = []
        row = 0
        for s, sp in zip(batch.scheduled, seqs):
            if not s.samples:
                continue
            last = s.start + s.num_tokens - s.num_spec - 1           # the last real token's position
            upper.append(Span(row, 1 + s.num_spec, last, sp.table, s.draft))
            row += 1 + s.num_spec
        pick = torch.tensor(logit_rows, dtype=torch.long)
        inputs.upper = self._inputs(ids[pick], positions[pick], slots[pick], list(range(len(logit_rows))), upper,
                                    varlen)
        inputs.upper_rows = pick.to(self.device)

    def _inputs(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, logit_rows: list[int],
                seqs: list[Span], varlen: bool) -> BatchInputs:
        """The device inputs of a flat batch: with `varlen`, every sequence but draft trees in one varlen batch;
        otherwise decodes in the decode group and multi-token sequences in span batches."""
        dev = self.device
        every_row = logit_rows == list(range(ids.numel()))
        if varlen:
            packed, decodes, spans = [sp for sp in seqs if not sp.draft], [], [sp for sp in seqs if sp.draft]
        else:
            packed, decodes, spans = [], [sp for sp in seqs if sp.n == 1], [sp for sp in seqs if sp.n > 1]
        inputs = BatchInputs(
            input_ids=ids.to(dev), positions=positions.to(dev), slots=slots.to(dev),
            logit_rows=None if every_row else torch.tensor(logit_rows, device=dev, dtype=torch.long),
            decode_rows=None, decode_tables=None, decode_lens=None,
            spans=self._span_batches(spans),
        )
        if packed:
            inputs.varlen = pack([sp.row for sp in packed], [sp.n for sp in packed], [sp.start for sp in packed],
                                 [sp.table for sp in packed], len(packed) == len(seqs), self.block_size, dev,
                                 self.varlen)
        if decodes:
            width = max(len(sp.table) for sp in decodes)
            if spans:
                inputs.decode_rows = torch.tensor([sp.row for sp in decodes], device=dev)
            inputs.decode_tables = torch.tensor([sp.table + [0] * (width - len(sp.table)) for sp in decodes],
                                                device=dev)
            inputs.decode_lens = torch.tensor([sp.start + 1 for sp in decodes], device=dev)
        return inputs

    @torch.inference_mode()   # the inputs too: compiled code is guarded on inference tensors, as execute makes
    def _compile_eager_structures(self) -> None:
        """Compile the eager path for every batch structure before serving, instead of stalling the first request
        that brings a new one for seconds: prompts of one length (causal) or not (masked), one or two of them,
        beside no, one or two decodes, plus decodes alone; each at a small and a larger size (tables of one block
        and of two), in case a size of 1 specialises. With a varlen kernel these collapse into fewer structures
        (prompts of any kind beside any decodes are one varlen batch), met here all the same. The batches are
        synthetic: every token reads and writes only the scratch block past the pool."""
        bs, scratch = self.block_size, self.scratch
        for small in (True, False):
            n = 2 if small else bs + 3                       # tokens per prompt; its context's blocks below
            table = [scratch] * -(-(n + 2) // bs)
            for causal, prompts, decodes in itertools.product((True, False), (0, 1, 2), (0, 1, 2)):
                if prompts + decodes == 0 or (prompts == 0 and not causal):
                    continue
                spans = [Span(row * n, n + (0 if causal else row), 0, table) for row in range(prompts)]
                if prompts == 1 and not causal:               # one prompt, masked: a prefix-cache hit
                    spans = [Span(0, n, 1, table)]
                tokens = sum(sp.n for sp in spans)
                seqs = spans + [Span(tokens + j, 1, n - 1, table) for j in range(decodes)]
                total = tokens + decodes
                positions, slots = self._token_layout(seqs, total)
                self._run_eager(self._inputs(torch.zeros(total, dtype=torch.long), positions, slots,
                                             list(range(total)), seqs, self._uses_varlen(seqs)))

    def _span_batches(self, spans: list[Span]) -> list[SpanBatch]:
        """Group multi-token sequences into as few SDPA calls as the mask limit allows: one call per layer for a
        whole step's prompts, instead of one per prompt (the launches of which dominated steps with many prompts).
        Index tensors come from torch ops over the group's sequences, not from Python lists per token."""
        dev = self.device
        if not spans:
            return []
        if all(sp.start == 0 and sp.n == spans[0].n and not sp.draft for sp in spans):
            rows = torch.tensor([sp.row for sp in spans], dtype=torch.long)[:, None] + torch.arange(spans[0].n)
            return [SpanBatch(rows.to(dev), causal=True)]
        # Longest context first (the first of a group has the widest table); a group grows while its padded mask,
        # sequences x longest query x widest context, stays under the limit.
        spans = sorted(spans, key=lambda sp: -(sp.start + sp.n))
        groups: list[list[Span]] = []
        lq = 0
        for sp in spans:
            if groups and (len(groups[-1]) + 1) * max(lq, sp.n) * len(groups[-1][0].table) * self.block_size \
                    <= SPAN_MASK_LIMIT:
                groups[-1].append(sp)
                lq = max(lq, sp.n)
            else:
                groups.append([sp])
                lq = sp.n
        batches = []
        for g in groups:
            lq = max(sp.n for sp in g)
            width = max(len(sp.table) for sp in g)
            n = torch.tensor([sp.n for sp in g], dtype=torch.long)[:, None]
            i = torch.minimum(torch.arange(lq)[None, :], n - 1)    # a shorter sequence repeats its last row
            rows = torch.tensor([sp.row for sp in g], dtype=torch.long)[:, None] + i
            qpos = (torch.tensor([sp.start for sp in g], dtype=torch.long)[:, None] + i).to(dev)
            real = torch.arange(lq)[None, :] < n
            keys = torch.arange(width * self.block_size, device=dev)
            mask = keys[None, None, :] <= qpos[:, :, None]
            for g_i, sp in enumerate(g):
                if sp.draft:                  # draft nodes see their ancestors only, not every earlier node
                    m = len(sp.draft)
                    first = sp.start + sp.n - m
                    mask[g_i, sp.n - m:sp.n, first:first + m] = torch.tensor(tree_visibility(sp.draft), device=dev)
            batches.append(SpanBatch(
                rows.to(dev), causal=False, mask=mask, valid=real.flatten().nonzero().squeeze(1).to(dev),
                out_rows=rows[real].to(dev),
                tables=torch.tensor([sp.table + [0] * (width - len(sp.table)) for sp in g], device=dev)))
        return batches

    # Running ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, blocks: BlockManager) -> torch.Tensor:
        """Compute the batch's KV into the cache and return fp32 logits at its sampling positions, in order."""
        n = len(batch.scheduled)
        if self.graphs and n <= max(self.graphs) and all(s.num_tokens == 1 for s in batch.scheduled):
            return self._replay(batch, blocks)
        if self.verification_shape(batch) is not None:
            return self.run_tree_group(batch, blocks)
        tokens = sum(s.num_tokens for s in batch.scheduled)
        if self.piecewise is not None and self.piecewise.size_for(tokens) is not None:
            return self._run_piecewise(self.prepare(batch, blocks))
        return self._run_eager(self.prepare(batch, blocks))

    def _run_piecewise(self, inputs: BatchInputs) -> torch.Tensor:
        """A batch through the piecewise graphs: each layer's cache writes and attention run eagerly between the
        captured pieces, exactly as `paged_attention` does them; logits as `_forward` computes them. A SwiftKV
        model's pieces stop at layer l, and its bulk KV write and upper layers follow as in `_forward_swiftkv`."""
        mask = group_mask(inputs, self.block_size) if inputs.decode_lens is not None else None

        def attention(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self.k_cache[self.cache_of_layer[i]], self.v_cache[self.cache_of_layer[i]]
            kc.index_copy_(0, inputs.slots, k)
            vc.index_copy_(0, inputs.slots, v)
            return attend(q, k, v, kc, vc, inputs, mask, self.block_size)

        with sdpa_kernel(EAGER_ATTENTION):
            x = self.piecewise.run(inputs.input_ids, inputs.positions, attention)
            if self.swiftkv is not None:
                n = x.shape[0]
                return self._swiftkv_upper(inputs, x, self.piecewise.cos[:n], self.piecewise.sin[:n], mask,
                                           self._eager_upper)
        if inputs.logit_rows is not None:
            x = x[inputs.logit_rows]
        m = self.model
        return m.lm_head(m.norm(x)).float()

    def _run_eager(self, inputs: BatchInputs) -> torch.Tensor:
        """A batch the graphs do not take, through the eager (or dynamically compiled) layer; callers run in
        inference mode."""
        with sdpa_kernel(EAGER_ATTENTION), _dynamic_shapes():
            return self._forward(inputs, self._eager_block, self._eager_upper)

    def _forward(self, inputs: BatchInputs, block: Callable | None = None,
                 upper_block: Callable | None = None) -> torch.Tensor:
        """The model over a flat batch; `block` replaces `decoder_layer` for every layer (its compiled form), and
        `upper_block` SwiftKV's `upper_decoder_layer`."""
        m = self.model
        block = block or decoder_layer
        x = m.embed_tokens(inputs.input_ids)
        # Broadcast dims of size 1 are added inside the layer, where the compiler sees them as constants.
        cos, sin = m.rotary(inputs.positions, x.dtype)
        mask = group_mask(inputs, self.block_size) if inputs.decode_lens is not None else None
        if self.swiftkv is not None:
            return self._forward_swiftkv(inputs, x, cos, sin, mask, block, upper_block or upper_decoder_layer)
        for layer, c in zip(m.layers, self.cache_of_layer):
            x = block(layer, x, cos, sin, self.k_cache[c], self.v_cache[c], inputs, mask, self.block_size)
        if inputs.logit_rows is not None:
            x = x[inputs.logit_rows]
        return m.lm_head(m.norm(x)).float()

    def _forward_swiftkv(self, inputs: BatchInputs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         mask: torch.Tensor | None, block: Callable, upper_block: Callable) -> torch.Tensor:
        """SwiftKV: layers < l for every row; the KV of every layer >= l from norm(h_l) in one bulk step; layers
        >= l only for the rows that need logits (`inputs.upper`)."""
        m, path, bs = self.model, self.swiftkv, self.block_size
        for j in range(path.layer):
            x = block(m.layers[j], x, cos, sin, self.k_cache[j], self.v_cache[j], inputs, mask, bs)
        return self._swiftkv_upper(inputs, x, cos, sin, mask, upper_block)

    def _swiftkv_upper(self, inputs: BatchInputs, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor | None, upper_block: Callable) -> torch.Tensor:
        """SwiftKV from h_l = `x`: the bulk KV write of every layer >= l, then those layers over the rows that
        need logits."""
        m, path, bs = self.model, self.swiftkv, self.block_size
        path.write_kv(x, cos, sin, inputs.slots, self.k_cache[path.layer:], self.v_cache[path.layer:])
        up = inputs.upper
        if up is None:
            up, up_mask = inputs, mask
        else:
            if up.input_ids.numel() == 0:         # no sequence samples this step (prefill chunks only)
                return torch.empty(0, m.config.vocab_size, device=x.device)
            x, cos, sin = x[inputs.upper_rows], cos[inputs.upper_rows], sin[inputs.upper_rows]
            up_mask = group_mask(up, bs) if up.decode_lens is not None else None
        pieces = self.upper_pieces
        if pieces is not None and pieces.size_for(x.shape[0]) is not None:
            def attention(j: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                c = self.cache_of_layer[j]
                return attend(q, None, None, self.k_cache[c], self.v_cache[c], up, up_mask, bs)

            return m.lm_head(m.norm(pieces.run_hidden(x, cos, sin, attention))).float()
        for j in range(path.layer, m.config.num_layers):
            c = self.cache_of_layer[j]
            x = upper_block(m.layers[j], path.q_proj[j], x, cos, sin, self.k_cache[c], self.v_cache[c], up, up_mask,
                            bs)
        return m.lm_head(m.norm(x)).float()

    # CUDA graphs -----------------------------------------------------------------------------------------------

    def _capture(self, sizes: list[int], width: int, tree_rows: dict[int, int]) -> None:
        """Capture decode graphs at every size, and verification graphs at every size in `tree_rows` (with that
        many rows per sequence), all in one memory pool."""
        block = upper = None
        if self.compile:
            # Regional compilation: every layer shares one compiled block (its weights and cache are inputs, not
            # constants), so compiling costs one layer per captured shape, not the whole stack. Static shapes
            # (per_size): each shape is its own specialisation, compiled in the warm-up below; dynamic: the first
            # warm-up of two or more sequences compiles for all of them, and batch 1 compiles once more.
            dynamic = self.graph_compile == "dynamic"
            block = torch.compile(decoder_layer, dynamic=dynamic, fullgraph=True)
            upper = torch.compile(upper_decoder_layer, dynamic=dynamic, fullgraph=True)
        self._decode_inputs = GraphInputs({b: 1 for b in sizes}, width, self.scratch, self.block_size, self.device)
        shapes = [(self._decode_inputs, b) for b in sorted(sizes, reverse=True)]
        if tree_rows:
            self._tree_inputs = GraphInputs(tree_rows, width, self.scratch, self.block_size, self.device)
            shapes += [(self._tree_inputs, b) for b in sorted(tree_rows, reverse=True)]
        pool = None
        with torch.inference_mode():
            # Only compiling is slow enough (tens of seconds per shape) to need a progress bar.
            for buffers, b in tqdm(shapes, desc="compiling decode graphs", unit="shape", disable=not self.compile):
                inputs = buffers.inputs(b)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(inputs, block, upper)   # warm-up outside the graph (compile, lazy inits, tuning)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(inputs, block, upper)
                pool = graph.pool()
                (self.tree_graphs if buffers is self._tree_inputs else self.graphs)[b] = (graph, out)
        torch.cuda.synchronize()

    def _replay(self, batch: SchedulerOutput, blocks: BlockManager) -> torch.Tensor:
        """Run an all-decode batch through the smallest captured graph that fits it."""
        b = self._decode_inputs.fill(batch, blocks)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:len(batch.scheduled)]

    def verification_shape(self, batch: SchedulerOutput) -> int | None:
        """The size of the verification graph that takes this batch, or None: every sequence decodes (its last
        token, plus a draft that fits the graph's rows) and some sequence has a draft."""
        buffers = self._tree_inputs
        if buffers is None or not any(s.draft for s in batch.scheduled):
            return None
        b = buffers.size_for(len(batch.scheduled))
        if b is None:
            return None
        rows = buffers.rows[b]
        if all(s.num_tokens == 1 + len(s.draft) <= rows for s in batch.scheduled):
            return b
        return None

    def run_tree_group(self, batch: SchedulerOutput, blocks: BlockManager) -> torch.Tensor:
        """A verification batch in the padded layout of the verification graphs: replayed on CUDA, run eagerly
        where nothing was captured (tests compare it with the eager path). Logits at the sampling rows, in order."""
        buffers = self._tree_inputs
        b = buffers.fill(batch, blocks)
        if b in self.tree_graphs:
            graph, out = self.tree_graphs[b]
            graph.replay()
        else:
            out = self._forward(buffers.inputs(b))
        rows = buffers.rows[b]
        keep = [j * rows + r for j, s in enumerate(batch.scheduled) for r in range(s.num_tokens)]
        return out[torch.tensor(keep, device=out.device)]

    def enable_tree_group(self, rows: dict[int, int], max_model_len: int) -> None:
        """Set up the padded verification layout without capturing graphs (CPU tests of that layout)."""
        self._tree_inputs = GraphInputs(rows, -(-max_model_len // self.block_size), self.scratch, self.block_size,
                                        self.device)

    @torch.inference_mode()
    def move_kv(self, src: list[int], dst: list[int]) -> None:
        """Copy the KV at cache slots `src` to slots `dst` in every layer: an accepted draft path's nodes were
        written at the slots after the last token in node order, and belong at the positions of their depths.
        Every source is read before any destination is written. On CUDA one captured graph does every layer's
        copy (two small kernels a layer, eagerly, would cost a good part of a small model's decode step)."""
        if not src:
            return
        if self._move is not None and len(src) <= self._move_max:
            graph, host, dev = self._move
            m, pad = self._move_max, self.scratch * self.block_size
            host.numpy()[:] = src + [pad] * (m - len(src)) + dst + [pad] * (m - len(dst))
            dev.copy_(host, non_blocking=True)
            graph.replay()
            torch.cuda.current_stream().synchronize()         # the host buffer is reused by the next move
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        self._copy_slots(s, d)

    def _copy_slots(self, s: torch.Tensor, d: torch.Tensor) -> None:
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[d] = kc[s]
            vc[d] = vc[s]

    def _capture_move(self, max_moves: int) -> None:
        """The KV move as one graph over `max_moves` (source, destination) slot pairs; unused pairs copy the
        scratch block's first slot onto itself."""
        host = torch.full((2 * max_moves,), self.scratch * self.block_size, dtype=torch.long, pin_memory=True)
        dev = host.to(self.device)
        s, d = dev[:max_moves], dev[max_moves:]
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._copy_slots(s, d)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._copy_slots(s, d)
        torch.cuda.synchronize()
        self._move, self._move_max = (graph, host, dev), max_moves


class SwiftKVPath:
    """What the runner needs of a SwiftKV model: l, each upper layer's query projection, and the K/V projections
    of every upper cache joined into one weight, so that one matmul over norm(h_l) yields every upper cache's
    keys and values (the bulk step)."""

    def __init__(self, model: SwiftKVTransformer):
        skv, L = model.swiftkv, model.config.num_layers
        self.layer = skv.layer
        self.norm = model.swiftkv_norm
        self.q_proj = {j: model.swiftkv_q_proj[str(j)] for j in range(skv.layer, L)}
        starts = skv.group_starts(L)
        self.num_caches = len(starts)
        self.head_dim = model.config.head_dim
        # Joined in place (the projections become views of it, as Transformer.fuse_projections joins Q/K/V).
        self.kv_weight = join_rows([model.swiftkv_k_proj[str(c)] for c in starts]
                                   + [model.swiftkv_v_proj[str(c)] for c in starts]) if starts else None

    def write_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
        """Write the keys and values of every upper cache for every row, from h_l = `h` [N, d]."""
        if self.kv_weight is None:
            return
        N, G = h.shape[0], self.num_caches
        kv = F.linear(self.norm(h), self.kv_weight).view(N, 2 * G, -1, self.head_dim)
        k = apply_rotary(kv[:, :G], cos[:, None, None, :], sin[:, None, None, :])
        for g in range(G):
            k_caches[g].index_copy_(0, slots, k[:, g])
            v_caches[g].index_copy_(0, slots, kv[:, G + g])


class GraphInputs:
    """The static inputs of graphs captured at padded batch sizes, `rows[b]` rows per sequence at size b (1 for
    decodes; the last token plus the draft cap for verification). Every field is a view of one device buffer,
    filled from one pinned host buffer, so that a replay costs one host-to-device copy; the host side is written
    through numpy, which takes Python lists far faster than torch.tensor does. Padding rows write to the scratch
    block past the pool and attend to it."""

    def __init__(self, rows: dict[int, int], width: int, scratch: int, block_size: int, device: torch.device):
        self.rows = dict(rows)
        self.sizes = sorted(rows)
        self.width, self.scratch, self.block_size = width, scratch, block_size
        self.tree = max(rows.values()) > 1
        B = max(self.sizes)
        R = max(b * t for b, t in rows.items())
        tree = max(b * t * t for b, t in rows.items()) if self.tree else 0
        self._lengths = (R, R, R, B, B * width, tree)     # ids, positions, slots, lens, tables, tree
        cuda = torch.device(device).type == "cuda"
        host = torch.empty(sum(self._lengths), dtype=torch.long, pin_memory=cuda)
        self._host_fields = self._split(host.numpy())
        # Until filled (capture, warm-up) every row is padding that sees the scratch block's finite keys: a row
        # that saw no key would write NaN into the scratch block, which masked keys of real rows multiply by 0.
        ids, pos, slots, lens, tables, tr = self._host_fields
        ids[:], pos[:], slots[:], lens[:], tables[:], tr[:] = 0, 0, scratch * block_size, 1, scratch, 1
        self._host, self._dev = host, host.to(device)
        self._dev_fields = self._split(self._dev)
        # Recorded after each upload: the host buffer may be rewritten only once the copy has read it.
        self._uploaded = torch.cuda.Event() if cuda else None
        self._pad_table = [scratch] * width

    def _split(self, buf) -> list:
        """The fields as consecutive views of `buf` (the device tensor or the host buffer's numpy array)."""
        out, at = [], 0
        for n in self._lengths:
            out.append(buf[at:at + n])
            at += n
        return out

    def size_for(self, n: int) -> int | None:
        """The smallest captured size that holds n sequences."""
        return next((b for b in self.sizes if b >= n), None)

    def inputs(self, b: int) -> BatchInputs:
        t = self.rows[b]
        ids, pos, slots, lens, tables, tree = self._dev_fields
        return BatchInputs(ids[:b * t], pos[:b * t], slots[:b * t], None, None,
                           tables[:b * self.width].view(b, self.width), lens[:b], [],
                           tree[:b * t * t].view(b, t, t) if self.tree else None)

    def fill(self, batch: SchedulerOutput, blocks: BlockManager) -> int:
        """Write the batch into the host buffer in the layout of the smallest size that fits, upload it, and
        return that size. This runs every decode step, so the inputs are gathered into flat Python lists in one
        pass. A sequence's rows: its last token at its position, then its draft's nodes at position + depth, their
        KV at the slots after the last token; the rest padding."""
        scheduled = batch.scheduled
        n = len(scheduled)
        b = self.size_for(n)
        t = self.rows[b]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        tables: list[int] = []
        tree: list[int] = []
        pad_slot = self.scratch * self.block_size
        for s in scheduled:
            p = s.start
            used = blocks.blocks_needed(p + s.num_tokens)
            lens.append(p + 1)
            tables += s.seq.block_table[:used]
            tables += self._pad_table[used:]
            if t == 1:
                ids += s.input_ids()
                pos.append(p)
                slots.append(blocks.slot(s.seq, p))
                continue
            m = len(s.draft)
            ids += s.input_ids() + [0] * (t - 1 - m)
            pos += s.positions() + [p] * (t - 1 - m)
            slots += [blocks.slot(s.seq, p + r) for r in range(m + 1)] + [pad_slot] * (t - 1 - m)
            root_only = [1] + [0] * (t - 1)
            tree += root_only
            for seen in tree_visibility(s.draft):
                tree += [1] + [int(v) for v in seen] + [0] * (t - 1 - m)
            tree += root_only * (t - 1 - m)
        if self._uploaded is not None:
            self._uploaded.synchronize()
        h_ids, h_pos, h_slots, h_lens, h_tables, h_tree = self._host_fields
        h_ids[:len(ids)] = ids
        h_pos[:len(pos)] = pos
        h_slots[:len(slots)] = slots
        h_lens[:n] = lens
        h_tables[:len(tables)] = tables
        # Padding sequences: token 0 at position 0, writing to the scratch block and attending to it alone.
        h_ids[n * t:b * t] = 0
        h_pos[n * t:b * t] = 0
        h_slots[n * t:b * t] = pad_slot
        h_lens[n:b] = 1
        h_tables[n * self.width:b * self.width] = self.scratch
        if self.tree:
            h_tree[:len(tree)] = tree
            pad = h_tree[n * t * t:b * t * t].reshape(-1, t)
            pad[:] = 0
            pad[:, 0] = 1
        self._dev.copy_(self._host, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()
        return b
