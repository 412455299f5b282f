"""Varlen attention for the eager steps: every sequence's queries against its own cached keys, packed, no masks.

An eager step (prompts of several lengths, chunked-prefill continuations, prefix-cache hits, prompts beside
decodes) holds sequences with `n` queries each at positions [start, start + n), whose keys are positions
[0, start + n) of the same sequence. Packed, the queries are the flat batch's rows in sequence order and the keys
are each sequence's cache slots one after the other (`key_slots`); `cu_q` / `cu_k` are where each sequence's
queries and keys begin. Query j of a sequence sees its keys up to j + (keys - queries): causal attention aligned
to the bottom right, which is what FlashAttention's varlen kernel computes with `causal`. Nothing of size
queries x keys is built and the K/V heads are not repeated to the query heads (the kernel groups them), whereas
the dense path pads every sequence to the longest, materialises a boolean mask and runs SDPA's unfused math kernel.

Two kernels take the packed layout: torch's `varlen_attn` (FlashAttention; CUDA, bf16/fp16) and a plain-torch
reference (a block-diagonal bottom-right mask over the packed batch; any device and dtype, O(queries x keys)
memory), against which the flash kernel is checked once when a runner starts, and with which CPU tests check the
layout. Speculative draft trees (nodes see their ancestors only) are not causal and stay on the dense path.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glassbox.errors import GlassboxError

log = logging.getLogger(__name__)

# q [Tq, heads, d], k / v [Tk, kv_heads, d], cu_q / cu_k [S + 1] int32, max_q, max_k -> [Tq, heads, d].
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                        torch.Tensor]

ATTENTION_MODES = ("auto", "dense", "varlen", "reference")


@dataclass
class VarlenBatch:
    """The packed sequences of one step. `rows` [Tq] are their query rows in the flat batch (None: every row, in
    order); `key_slots` [Tk] the cache slots of their keys; `kernel` the runner's varlen kernel."""

    rows: torch.Tensor | None
    key_slots: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    kernel: VarlenKernel


def pack(rows: Sequence[int], ns: Sequence[int], starts: Sequence[int], tables: Sequence[Sequence[int]],
         every_row: bool, block_size: int, device: torch.device, kernel: VarlenKernel) -> VarlenBatch:
    """The packed layout of sequences with `ns[i]` queries from position `starts[i]` at flat rows
    [rows[i], rows[i] + ns[i]), their blocks in `tables[i]`. Index tensors are built with torch ops on the host
    (a few per step, not a Python item per token) and sent to the device in one copy."""
    S = len(ns)
    n = torch.tensor(ns, dtype=torch.long)
    lens = n + torch.tensor(starts, dtype=torch.long)
    cu = torch.zeros(2, S + 1, dtype=torch.long)
    torch.cumsum(n, 0, out=cu[0, 1:])
    torch.cumsum(lens, 0, out=cu[1, 1:])
    tq, tk = int(cu[0, -1]), int(cu[1, -1])
    seq = torch.arange(S)
    # Key i of sequence s is position i - cu_k[s], in block tables[s][pos // block_size].
    k_seq = torch.repeat_interleave(seq, lens, output_size=tk)
    k_pos = torch.arange(tk) - cu[1, :-1][k_seq]
    key_slots = cache_slots(tables, k_seq, k_pos, block_size)
    parts = [cu.flatten(), key_slots]
    if not every_row:
        q_seq = torch.repeat_interleave(seq, n, output_size=tq)
        parts.append(torch.tensor(rows, dtype=torch.long)[q_seq] + torch.arange(tq) - cu[0, :-1][q_seq])
    dev = torch.cat(parts).to(device, non_blocking=True)
    cu_dev, at = dev[:2 * (S + 1)].to(torch.int32), 2 * (S + 1)
    return VarlenBatch(rows=None if every_row else dev[at + tk:], key_slots=dev[at:at + tk], cu_q=cu_dev[:S + 1],
                       cu_k=cu_dev[S + 1:], max_q=max(ns), max_k=int(lens.max()), kernel=kernel)


def cache_slots(tables: Sequence[Sequence[int]], seq: torch.Tensor, pos: torch.Tensor,
                block_size: int) -> torch.Tensor:
    """The flat cache slots of sequence `seq[i]`'s token at position `pos[i]` (host tensors), through the
    sequences' block `tables`: block table[pos // block_size], offset pos % block_size."""
    widths = torch.tensor([len(t) for t in tables], dtype=torch.long)
    table_at = torch.cumsum(widths, 0) - widths
    flat = torch.tensor(list(itertools.chain.from_iterable(tables)), dtype=torch.long)
    return flat[table_at[seq] + pos // block_size] * block_size + pos % block_size


def varlen_attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: VarlenBatch) -> torch.Tensor:
    """Attention of the packed queries q [Tq, heads, d] over their sequences' cached keys (this step's included)."""
    return batch.kernel(q, kc[batch.key_slots], vc[batch.key_slots], batch.cu_q, batch.cu_k, batch.max_q,
                        batch.max_k)


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int) -> torch.Tensor:
    """The varlen kernel's semantics in plain torch: one SDPA call over the packed batch whose mask lets a query
    see the keys of its own sequence that are at least as far from the sequence's end as itself (bottom-right
    causal). Its mask is Tq x Tk: a reference and a CPU stand-in, not a fast path."""
    cu_q, cu_k = cu_q.long(), cu_k.long()
    qi = torch.arange(q.shape[0], device=q.device)
    ki = torch.arange(k.shape[0], device=q.device)
    q_seq = torch.searchsorted(cu_q[1:], qi, right=True)
    k_seq = torch.searchsorted(cu_k[1:], ki, right=True)
    q_from_end = cu_q[1:][q_seq] - qi                     # 1 for a sequence's last query
    k_from_end = cu_k[1:][k_seq] - ki
    mask = (q_seq[:, None] == k_seq[None, :]) & (k_from_end[None, :] >= q_from_end[:, None])
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


@functools.cache
def flash_varlen() -> tuple[VarlenKernel | None, str]:
    """torch's `varlen_attn`, called causal with grouped K/V heads, or None and why not. Its keywords changed
    between releases (`is_causal` in 2.10; `window_size=(-1, 0)` later; `enable_gqa` from 2.12, before which the
    flash kernel took fewer K/V heads as they came), so they are read from its signature. One object for the
    process: compiled code guards on the kernel's identity, so every runner's steps share their compiles."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        kwargs: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kwargs = {"is_causal": True}
    else:
        return None, f"torch {torch.__version__}'s varlen_attn takes neither window_size nor is_causal"
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return functools.partial(varlen_attn, **kwargs), "ok"


def probe(kernel: VarlenKernel, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
          head_dim: int) -> str | None:
    """Run `kernel` once on a small packed batch (a fresh prompt, a chunked continuation, a decode) at the model's
    head counts and compare it with the reference in fp32; None if it agrees, else what went wrong. This is what
    fixes the kernel's alignment, grouping and dtype support on this torch and card before any request."""
    gen = torch.Generator().manual_seed(0)
    qs, ks = [5, 3, 1], [5, 11, 7]
    shape = lambda t, h: torch.randn(t, h, head_dim, generator=gen).to(device)      # noqa: E731
    q, k, v = shape(sum(qs), heads), shape(sum(ks), kv_heads), shape(sum(ks), kv_heads)
    cu_q = torch.tensor([0] + list(itertools.accumulate(qs)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(itertools.accumulate(ks)), dtype=torch.int32, device=device)
    try:
        with torch.inference_mode():
            got = kernel(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, max(qs), max(ks)).float()
    except Exception as e:            # unsupported dtype, head size, card or build: any of them means dense
        return f"{type(e).__name__}: {e}"
    want = reference_varlen(q, k, v, cu_q, cu_k, max(qs), max(ks))
    err = float((got - want).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 5e-2        # a misaligned or ungrouped kernel is off by O(1)
    return None if err <= tol else f"differs from the reference by {err:.3g} (> {tol})"


def choose_kernel(mode: str, device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                  head_dim: int) -> VarlenKernel | None:
    """The varlen kernel a runner uses for its eager steps, chosen once: `auto` takes the flash kernel where it
    runs and agrees with the reference (CUDA, bf16 / fp16), else the dense path (None); `varlen` insists on the
    flash kernel; `reference` takes the plain-torch kernel (checks of the layout on a CPU); `dense` is None."""
    if mode not in ATTENTION_MODES:
        raise GlassboxError(f"model runner attention {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    if mode == "dense":
        return None
    if mode == "reference":
        return reference_varlen
    kernel, why = flash_varlen()
    expected = False              # a CPU or fp32 runner is dense by design; anything else deserves a warning
    if kernel is None:
        pass
    elif device.type != "cuda":
        why, expected = f"the flash kernel runs on CUDA only, this runner is on {device}", True
    elif dtype not in (torch.bfloat16, torch.float16):
        why, expected = f"the flash kernel takes bf16 and fp16, the model is {dtype}", True
    else:
        why = probe(kernel, device, dtype, heads, kv_heads, head_dim)
        if why is None:
            log.info("eager steps use the varlen flash attention kernel")
            return kernel
    if mode == "varlen":
        raise GlassboxError(f"model runner attention 'varlen': the flash kernel cannot serve this model: {why}")
    (log.info if expected else log.warning)("eager steps use the dense masked attention path: %s", why)
    return None
