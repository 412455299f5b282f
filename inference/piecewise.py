"""Piecewise CUDA graphs: the steps the decode graphs cannot take (prompts, prefill chunks, prompts beside decodes)
replayed as graphs everywhere but attention.

What changes from one such step to the next is attention's input: how many sequences, how long, which cache
blocks. Everything else in a layer (norms, projections, rotary, the MLP, residuals) works row by row and depends
only on how many tokens the step holds. So the layer stack is cut at attention. Piece 0 embeds the tokens, builds
the rotary tables and runs layer 0's norm and Q/K/V projections; piece i (1..L-1) runs layer i-1's output
projection, residual, MLP and residual, then layer i's norm and Q/K/V; piece L finishes layer L-1. Each piece is
captured once per padded token count, all of them into one memory pool, and reads and writes fixed buffers; between
pieces the runner writes the step's K/V into the cache and attends, eagerly, over the real rows only. A step of n
tokens replays the pieces of the smallest captured count >= n: L + 1 graph launches and a few attention kernels
per layer instead of the ~45 eager kernels per layer that bound mixed steps (this is what vLLM V1 calls piecewise
graphs). Padding rows (token 0 at position 0) pass through the pieces but never through attention, so they write
no cache slot; rows do not mix outside attention, so padding cannot reach a real row.

Dense, unsharded models only: MoE routing reads expert counts on the host (no graph can hold it), and the
all-reduces of a tensor-parallel shard are not captured yet. A SwiftKV model gets two sets: layers 0..l-1 over
every token of the step, from the embeddings, and layers l..L-1 over the few rows that need logits, from h_l and
with the SwiftKV query projections only (their keys and values are in the cache already, written in bulk),
captured at the decode graphs' row counts. Without CUDA (tests) the same pieces run uncaptured on the same
padded buffers, which checks the cut and the padding against the eager path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx.experimental._config
from torch import nn
from tqdm.auto import tqdm

from glassbox.errors import GlassboxError
from glassbox.models.transformer import Block, Transformer, apply_rotary

# Attention of layer i over the step's real rows: (layer, q [n, heads, d], k, v [n, kv_heads, d]) -> [n, heads, d].
LayerAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def piecewise_sizes(max_tokens: int, smallest: int = 16) -> list[int]:
    """Token counts to capture: powers of two from `smallest` up to the step budget, and the budget itself."""
    sizes, n = [], smallest
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sizes + [max_tokens]


def qkv_into(layer: Block, q_proj: nn.Linear | None, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Layer's input norm, Q/K/V projections and rotary over rows x, into the buffers q, k, v; with `q_proj`
    (SwiftKV's upper layers) only the queries, through it."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    N, hd = x.shape[0], attn.head_dim
    cos, sin = cos[:, None, :], sin[:, None, :]
    if q_proj is not None:
        q.copy_(apply_rotary(q_proj(h).view(N, -1, hd), cos, sin))
        return
    qs, ks, vs = (t.view(N, -1, hd) for t in attn.project_qkv(h))
    q.copy_(apply_rotary(qs, cos, sin))
    k.copy_(apply_rotary(ks, cos, sin))
    v.copy_(vs)


def embed_piece(model: Transformer, first: Block, ids: torch.Tensor, positions: torch.Tensor, x: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Piece 0: embeddings and rotary tables into x, cos, sin; layer 0's queries, keys and values."""
    h = model.embed_tokens(ids)
    c, s = model.rotary(positions, h.dtype)
    x.copy_(h)
    cos.copy_(c)
    sin.copy_(s)
    qkv_into(first, None, h, c, s, q, k, v)


def entry_piece(first: Block, q_proj: nn.Linear | None, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Piece 0 of a stack that starts mid-model (SwiftKV's upper layers): the first layer's queries from x."""
    qkv_into(first, q_proj, x, cos, sin, q, k, v)


def layer_piece(prev: Block, nxt: Block | None, q_proj: nn.Linear | None, x: torch.Tensor, o: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Piece i: layer i-1 after its attention (output projection of `o`, residual, MLP, residual) into x; then
    layer i's queries, keys and values (none after the last layer). The residual structure is Block.forward's."""
    h = x + prev.self_attn.o_proj(o.flatten(1))
    h = h + prev.mlp(prev.post_attention_layernorm(h))
    x.copy_(h)
    if nxt is not None:
        qkv_into(nxt, q_proj, h, cos, sin, q, k, v)


class PiecewiseGraphs:
    """The pieces of one model at padded token counts `sizes`, with the fixed buffers they read and write; on CUDA
    captured as graphs (after a warm-up each), elsewhere run directly. `compile` runs each piece through
    torch.compile with dynamic shapes first: one compile per piece kind, whatever the sizes. `layers`: the
    model's layers [first, stop) the pieces cover (all by default); a stack from a later first layer starts from
    hidden states (`run_hidden`), not tokens, and with `q_projs` (layer -> query projection) computes queries
    only, through those projections."""

    def __init__(self, model: Transformer, sizes: list[int], capture: bool, compile: bool = False,
                 layers: tuple[int, int] | None = None, q_projs: dict[int, nn.Linear] | None = None):
        cfg = model.config
        if cfg.is_moe:
            raise GlassboxError("piecewise graphs: MoE routing reads expert counts on the host, which no graph can "
                                "hold; serve MoE models without piecewise_graphs")
        if not sizes or min(sizes) < 1:
            raise GlassboxError(f"piecewise graphs: token counts must be >= 1, got {sizes}")
        self.model = model
        self.first, self.stop = layers or (0, len(model.layers))
        if not 0 <= self.first < self.stop <= len(model.layers):
            raise GlassboxError(f"piecewise graphs: layers must be a range within [0, {len(model.layers)}), got "
                                f"{layers}")
        self.q_projs = q_projs or {}
        self.sizes = sorted(set(sizes))
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        attn = model.layers[0].self_attn
        hd, N = cfg.head_dim, self.sizes[-1]
        heads, kv_heads = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        self.ids = torch.zeros(N, dtype=torch.long, device=dev)
        self.positions = torch.zeros(N, dtype=torch.long, device=dev)
        self.x = torch.zeros(N, cfg.hidden_size, dtype=dt, device=dev)
        self.cos = torch.zeros(N, hd, dtype=dt, device=dev)
        self.sin = torch.zeros(N, hd, dtype=dt, device=dev)
        self.q = torch.zeros(N, heads, hd, dtype=dt, device=dev)
        self.k = torch.zeros(N, kv_heads, hd, dtype=dt, device=dev)
        self.v = torch.zeros(N, kv_heads, hd, dtype=dt, device=dev)
        self.o = torch.zeros(N, heads, hd, dtype=dt, device=dev)
        self._embed: Callable = embed_piece
        self._entry: Callable = entry_piece
        self._layer: Callable = layer_piece
        if compile:
            self._embed = torch.compile(embed_piece, dynamic=True)
            self._entry = torch.compile(entry_piece, dynamic=True)
            self._layer = torch.compile(layer_piece, dynamic=True)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self._capture()            # its warm-ups compile the pieces
        elif compile:
            self._warm_up()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run the pieces once at every size, so that compiling happens before serving, not in a request's step."""
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for n in self.sizes:
                for piece in self._pieces(n):
                    piece()

    def size_for(self, n: int) -> int | None:
        """The smallest token count captured that holds n rows, or None when the step is larger."""
        return next((s for s in self.sizes if s >= n), None)

    def _pieces(self, n: int) -> list[Callable[[], None]]:
        """The pieces over the first n rows of the buffers (one per layer covered, plus one), as closures with their
        arguments bound."""
        m, a, b, qp = self.model, self.first, self.stop, self.q_projs
        x, o, cos, sin = self.x[:n], self.o[:n], self.cos[:n], self.sin[:n]
        q, k, v = self.q[:n], self.k[:n], self.v[:n]
        if a == 0:
            pieces = [lambda: self._embed(m, m.layers[0], self.ids[:n], self.positions[:n], x, cos, sin, q, k, v)]
        else:
            pieces = [lambda: self._entry(m.layers[a], qp.get(a), x, cos, sin, q, k, v)]
        for i in range(a + 1, b + 1):
            nxt = m.layers[i] if i < b else None
            pieces.append(lambda prev=m.layers[i - 1], nxt=nxt, proj=qp.get(i):
                          self._layer(prev, nxt, proj, x, o, cos, sin, q, k, v))
        return pieces

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture every piece at every size, largest first, into one pool: the pieces run one after another and
        keep nothing of their own between replays (their outputs are the fixed buffers), so all share its memory."""
        pool = None
        # Compiled pieces trace the token count as a symbol of its own, even where it equals a model dimension.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            for n in tqdm(sorted(self.sizes, reverse=True), desc="capturing piecewise graphs", unit="size",
                          leave=False):
                pool = self._capture_size(n, pool)
        torch.cuda.synchronize()

    def _capture_size(self, n: int, pool: tuple | None) -> tuple:
        """Warm up and capture the pieces at n tokens in `pool` (None: a new one); return the pool."""
        pieces = self._pieces(n)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for piece in pieces:          # warm-up outside the graph (compile, cuBLAS workspaces, lazy inits)
                piece()
        torch.cuda.current_stream().wait_stream(stream)
        graphs = []
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                piece()
            pool = graph.pool()
            graphs.append(graph)
        self.graphs[n] = graphs
        return pool

    def run(self, ids: torch.Tensor, positions: torch.Tensor, attention: LayerAttention) -> torch.Tensor:
        """The hidden states after the last layer covered [n, hidden] (a view of the fixed buffer, valid until the
        next run; so are `cos` and `sin`) for a step of n = len(ids) <= max(sizes) tokens; `attention` does each
        layer's cache writes and attention over the real rows."""
        if self.first != 0:
            raise GlassboxError("piecewise graphs: a stack that starts mid-model runs from hidden states (run_hidden)")
        n = ids.numel()
        size = self._size(n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.ids[n:size].zero_()
        self.positions[n:size].zero_()
        return self._replay(n, size, attention)

    def run_hidden(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   attention: LayerAttention) -> torch.Tensor:
        """As `run`, for a stack from a later layer: from hidden states x [n, hidden] and their rotary tables."""
        n = x.shape[0]
        size = self._size(n)
        self.x[:n].copy_(x)
        self.cos[:n].copy_(cos)
        self.sin[:n].copy_(sin)
        return self._replay(n, size, attention)

    def _size(self, n: int) -> int:
        size = self.size_for(n)
        if size is None:
            raise GlassboxError(f"piecewise graphs: a step of {n} tokens exceeds the largest size "
                                f"({self.sizes[-1]})")
        return size

    def _replay(self, n: int, size: int, attention: LayerAttention) -> torch.Tensor:
        """Run the pieces at `size` (replayed where captured) with each layer's attention between them; padding
        rows hold finite values from earlier steps (or zeros), which no real row reads."""
        graphs = self.graphs.get(size)
        pieces = [g.replay for g in graphs] if graphs else self._pieces(size)
        for layer, piece in zip(range(self.first, self.stop + 1), pieces):
            piece()
            if layer < self.stop:
                self.o[:n].copy_(attention(layer, self.q[:n], self.k[:n], self.v[:n]))
        return self.x[:n]
