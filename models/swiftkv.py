"""SwiftKV: SingleInputKV and AcrossKV as a transform of glassbox's Transformer (ALGORITHMS.md, SwiftKV).

From layer `l` on, every layer's keys and values are computed from ONE input, the hidden state entering layer l
normed by a new RMSNorm, instead of from the layer's own input; each such layer gets a new query projection on
its own input. So a prompt token needs only layers 0..l-1 plus a few K/V projections to leave its KV in the cache:
the inference engine runs layers >= l only for tokens that need logits. AcrossKV further lets `group` consecutive
layers >= l share one K/V projection, hence one KV cache.

The transformed model keeps the base model's own weights untouched, including the original q/k/v projections of
the upper layers: `forward(ids, swiftkv=False)` is the base model exactly, which is the distillation teacher, and
`forward(ids)` is the student. The new tensors are `swiftkv_norm`, `swiftkv_q_proj.<layer>` for every layer >= l,
and `swiftkv_k_proj.<c>` / `swiftkv_v_proj.<c>` for the first layer c of every group.

Initialisation: `swiftkv_from_base` copies (ALGORITHMS.md: the paper's), which applies layer j's K/V projections
to norm(h_l) although they were trained on norm_j(h_j); `lsq_init` then optionally refits them in closed form so
that they predict the teacher's keys and values from norm(h_l) on calibration tokens (KVLeastSquares).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.errors import GlassboxError
from glassbox.models.transformer import Attention, ModelConfig, RMSNorm, Transformer, apply_rotary

# Names of the tensors the transform adds (fnmatch patterns): the only ones distillation trains.
SWIFTKV_PARAMETERS = ("swiftkv_*",)
# How `swiftkv convert` initialises the new tensors: the paper's copies, or copies with K/V refit (lsq_init).
INIT_METHODS = ("copy", "lsq")
# lsq_init's ridge, relative to the mean diagonal of the normal matrix: it keeps directions the calibration text
# never visits near zero, and more of it costs fit (SmolLM2-135M, l = 15, 4096 stdlib tokens: held-out KL 0.754
# at 1e-5 and 1e-4, 0.760 at 1e-3, 0.827 at 1e-2, 1.19 at 1e-1).
DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class SwiftKVConfig:
    layer: int          # l: layers below it are unchanged; every layer from it on reads its KV from norm(h_l)
    group: int = 1      # AcrossKV: consecutive layers >= l sharing one K/V projection and KV cache (1: none)

    def validate(self, num_layers: int) -> None:
        if not isinstance(self.layer, int) or not 1 <= self.layer <= num_layers:
            raise GlassboxError(f"swiftkv --layer {self.layer}: must be in [1, {num_layers}] for a model of "
                                f"{num_layers} layers (layers below it are kept; {num_layers} changes nothing)")
        if not isinstance(self.group, int) or self.group < 1:
            raise GlassboxError(f"swiftkv --group {self.group}: must be a positive integer")
        upper = num_layers - self.layer
        if upper % self.group:
            raise GlassboxError(f"swiftkv --group {self.group}: does not divide the {upper} layers from layer "
                                f"{self.layer} to {num_layers - 1} (AcrossKV groups consecutive upper layers)")

    def group_start(self, j: int) -> int:
        """The first layer of layer j's group (j >= layer): the owner of its K/V projection and cache."""
        return self.layer + (j - self.layer) // self.group * self.group

    def group_starts(self, num_layers: int) -> list[int]:
        return list(range(self.layer, num_layers, self.group))

    def num_kv_caches(self, num_layers: int) -> int:
        """KV caches the model needs: one per layer below l, one per group above."""
        return self.layer + len(self.group_starts(num_layers))

    def cache_of_layer(self, num_layers: int) -> list[int]:
        """Layer -> the index of the KV cache it reads (layers of one AcrossKV group share one)."""
        starts = self.group_starts(num_layers)
        return [j if j < self.layer else self.layer + starts.index(self.group_start(j)) for j in range(num_layers)]


def upper_attention(attn: Attention, q_proj: nn.Linear, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A layer >= l over a full sequence: its new query projection on its own normed input `h` [B, T, d]; keys
    and values [B, kv_heads, T, head_dim] (rotated) given, from norm(h_l); its own output projection."""
    B, T, _ = h.shape
    q = apply_rotary(q_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2), cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiftKVTransformer(Transformer):
    """The base Transformer plus the SwiftKV tensors; see the module docstring."""

    def __init__(self, cfg: ModelConfig, swiftkv: SwiftKVConfig):
        if cfg.is_moe:
            raise GlassboxError("swiftkv: MoE models are not supported (the transform is defined for dense Llama)")
        swiftkv.validate(cfg.num_layers)
        super().__init__(cfg)
        self.swiftkv = swiftkv
        d, hd = cfg.hidden_size, cfg.head_dim
        self.swiftkv_norm = RMSNorm(d, cfg.norm_eps)
        upper = range(swiftkv.layer, cfg.num_layers)
        starts = swiftkv.group_starts(cfg.num_layers)
        self.swiftkv_q_proj = nn.ModuleDict({str(j): nn.Linear(d, cfg.num_heads * hd, bias=False) for j in upper})
        self.swiftkv_k_proj = nn.ModuleDict({str(c): nn.Linear(d, cfg.num_kv_heads * hd, bias=False) for c in starts})
        self.swiftkv_v_proj = nn.ModuleDict({str(c): nn.Linear(d, cfg.num_kv_heads * hd, bias=False) for c in starts})
        for name, p in self.named_parameters():
            if name.startswith("swiftkv_"):
                self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        if name == "swiftkv_norm.weight":
            t.fill_(1.0)
        else:
            super().init_parameter(name, t)

    def upper_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict[int, tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
        """Group start -> (keys, values) [B, kv_heads, T, head_dim] of every upper group, from h_l = `x`."""
        B, T, _ = x.shape
        n = self.swiftkv_norm(x)
        hd = self.config.head_dim
        out = {}
        for c, k_proj in self.swiftkv_k_proj.items():
            k = apply_rotary(k_proj(n).view(B, T, -1, hd).transpose(1, 2), cos, sin)
            v = self.swiftkv_v_proj[c](n).view(B, T, -1, hd).transpose(1, 2)
            out[int(c)] = (k, v)
        return out

    def forward_hidden(self, input_ids: torch.Tensor, swiftkv: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, vocab], the hidden state entering the last layer [B, T, d]). `swiftkv=False` computes
        the base model (the teacher): the upper layers' original projections, none of the new tensors."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device), x.dtype)
        L, first = self.config.num_layers, self.swiftkv.layer
        kv = {}
        penultimate = x
        for j, layer in enumerate(self.layers):
            if j == L - 1:
                penultimate = x
            if swiftkv and j == first:
                kv = self.upper_kv(x, cos, sin)
            if swiftkv and j >= first:
                k, v = kv[self.swiftkv.group_start(j)]
                q_proj = self.swiftkv_q_proj[str(j)]

                def attention(h, cos, sin, attn=layer.self_attn, q_proj=q_proj, k=k, v=v):
                    return upper_attention(attn, q_proj, h, k, v, cos, sin)

                x = layer(x, cos, sin, attention=attention)
            else:
                x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)), penultimate

    def forward(self, input_ids: torch.Tensor, swiftkv: bool = True) -> torch.Tensor:
        return self.forward_hidden(input_ids, swiftkv)[0]


@torch.no_grad()
def swiftkv_from_base(base: Transformer, swiftkv: SwiftKVConfig) -> SwiftKVTransformer:
    """The transform, initialised as ALGORITHMS.md says: the new norm a copy of layer l's input norm, each new
    Q projection a copy of its layer's own, each K/V projection its layer's own (AcrossKV: the mean over the
    group). The base weights are copied, never shared, so `base` stays as it was."""
    cfg = base.config
    if type(base) is not Transformer:
        raise GlassboxError(f"swiftkv: the base model must be a plain glassbox Transformer, got {type(base).__name__}")
    device = next(base.parameters()).device
    with torch.device("meta"):
        model = SwiftKVTransformer(cfg, swiftkv)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layers = base.layers
    if swiftkv.layer < cfg.num_layers:
        state["swiftkv_norm.weight"] = layers[swiftkv.layer].input_layernorm.weight.clone()
    for j in range(swiftkv.layer, cfg.num_layers):
        state[f"swiftkv_q_proj.{j}.weight"] = layers[j].self_attn.q_proj.weight.clone()
    for c in swiftkv.group_starts(cfg.num_layers):
        members = [layers[j].self_attn for j in range(c, c + swiftkv.group)]
        state[f"swiftkv_k_proj.{c}.weight"] = torch.stack([a.k_proj.weight for a in members]).mean(0)
        state[f"swiftkv_v_proj.{c}.weight"] = torch.stack([a.v_proj.weight for a in members]).mean(0)
    if swiftkv.layer == cfg.num_layers:
        state["swiftkv_norm.weight"] = torch.ones(cfg.hidden_size, dtype=base.norm.weight.dtype, device=device)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.materialize(device).eval()


# Least-squares initialisation ---------------------------------------------------------------------------------


def teacher_layer_inputs(model: Transformer, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(j, the base model's hidden state entering layer j [B, T, d]) for every layer, as the forward reaches it,
    so a caller keeps only the layers it needs. A SwiftKVTransformer's layers are its base's: this is the teacher."""
    T = input_ids.shape[1]
    x = model.embed_tokens(input_ids)
    cos, sin = model.rotary(torch.arange(T, device=input_ids.device), x.dtype)
    for j, layer in enumerate(model.layers):
        yield j, x
        x = layer(x, cos, sin)


def teacher_kv(model: Transformer, j: int, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The base model's own pre-RoPE keys and values at layer j ({"k", "v"}: [B, T, kv_heads x head_dim]) from `h`,
    the hidden state entering it: what SwiftKV's projection for layer j's group is fitted to and scored against."""
    attn = model.layers[j].self_attn
    x = model.layers[j].input_layernorm(h)
    return {"k": attn.k_proj(x), "v": attn.v_proj(x)}


class KVLeastSquares:
    """The normal equations of SwiftKV's K/V projections as a least-squares fit to the teacher's, accumulated over
    calibration batches in float64 (memory independent of the token count).

    For every group start c, W_k^c minimises sum_t ||W n_t - kbar_t||^2 + lam ||W||^2 with n_t = swiftkv_norm(h_l,t)
    and kbar_t the mean over the group's layers j of the teacher's pre-RoPE keys W_k^j norm_j(h_j,t) (RoPE rotates
    after the projection, so fitting before it is exact); the same for values. A projection shared by a group must
    predict every member's target; sum_j ||W n - y_j||^2 = g ||W n - ybar||^2 + (the spread of the y_j, which W
    cannot change), so the shared least-squares solution is the fit to the mean target. Closed form:
    W = (sum ybar n^T)(sum n n^T + lam I)^-1, lam = ridge x the mean diagonal of sum n n^T (scale-free).
    """

    def __init__(self, model: SwiftKVTransformer):
        self.model = model
        d = model.config.hidden_size
        kv = model.config.num_kv_heads * model.config.head_dim
        device = model.embed_tokens.weight.device
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        starts = model.swiftkv.group_starts(model.config.num_layers)
        self.cross = {(c, kind): torch.zeros(kv, d, dtype=torch.float64, device=device)
                      for c in starts for kind in ("k", "v")}
        self.tokens = 0
        self._n = torch.zeros(0, d, dtype=torch.float64, device=device)    # norm(h_l) of the batch being observed

    @torch.no_grad()
    def add(self, input_ids: torch.Tensor) -> None:
        """Accumulate one calibration batch [B, T] of token ids."""
        for j, h in teacher_layer_inputs(self.model, input_ids):
            self.observe(j, h)

    @torch.no_grad()
    def observe(self, j: int, h: torch.Tensor) -> None:
        """Accumulate the teacher's hidden state `h` entering layer j, layers in order: one pass of the teacher
        can feed several fits (other l or g) this way."""
        skv = self.model.swiftkv
        if j == skv.layer:
            self._n = self.model.swiftkv_norm(h).flatten(0, 1).double()
            self.gram += self._n.T @ self._n
            self.tokens += self._n.shape[0]
        if j >= skv.layer:
            c = skv.group_start(j)
            for kind, y in teacher_kv(self.model, j, h).items():
                self.cross[c, kind] += y.flatten(0, 1).double().T @ self._n / skv.group

    def solve(self, ridge: float) -> dict[tuple[int, str], torch.Tensor]:
        """(group start, "k" or "v") -> the fitted projection [kv_heads x head_dim, d], in float64."""
        d = self.gram.shape[0]
        if self.tokens < d:
            raise GlassboxError(f"swiftkv --init lsq: {self.tokens} calibration tokens, fewer than the hidden size "
                                f"{d}: the {d}x{d} least-squares system is underdetermined (give at least {d} "
                                f"tokens, better 10x that, with --calib / --calib-tokens)")
        if not ridge >= 0:
            raise GlassboxError(f"swiftkv --ridge {ridge}: must be >= 0")
        lam = ridge * float(self.gram.diagonal().mean())
        eye = torch.eye(d, dtype=torch.float64, device=self.gram.device)
        factor, info = torch.linalg.cholesky_ex(self.gram + lam * eye)
        if info.item():
            raise GlassboxError(f"swiftkv --init lsq: the calibration tokens' normed hidden states span fewer than "
                                f"{d} dimensions (sum n n^T is singular at --ridge {ridge}); use more varied "
                                "calibration text or a positive --ridge")
        return {key: torch.cholesky_solve(b.T, factor).T for key, b in self.cross.items()}

    @torch.no_grad()
    def apply(self, ridge: float) -> None:
        """Write the solution into the model's K/V projections (in their dtype)."""
        projections = {"k": self.model.swiftkv_k_proj, "v": self.model.swiftkv_v_proj}
        for (c, kind), w in self.solve(ridge).items():
            target = projections[kind][str(c)].weight
            target.copy_(w.to(target.dtype))


@torch.no_grad()
def lsq_init(model: SwiftKVTransformer, batches: Iterable[torch.Tensor], ridge: float = DEFAULT_RIDGE) -> int:
    """Replace `model`'s K/V projections with their least-squares fit (KVLeastSquares) on calibration `batches`
    of token ids; returns the number of calibration tokens. The norm and Q projections keep their copy-init. At
    l = L there is nothing to fit and the model is left as it is."""
    if model.swiftkv.layer == model.config.num_layers:
        return 0
    fit = KVLeastSquares(model)
    for ids in batches:
        fit.add(ids.to(model.embed_tokens.weight.device))
    fit.apply(ridge)
    return fit.tokens


@torch.no_grad()
def kv_reconstruction_error(model: SwiftKVTransformer, input_ids: torch.Tensor) -> dict[str, float]:
    """Relative squared error of the student's pre-RoPE keys and values against the teacher's, summed over every
    layer >= l: sum ||W^c n - W^j norm_j(h_j)||^2 / sum ||W^j norm_j(h_j)||^2, for "k" and "v"."""
    skv, n = model.swiftkv, None
    err = {"k": 0.0, "v": 0.0}
    total = {"k": 0.0, "v": 0.0}
    for j, h in teacher_layer_inputs(model, input_ids):
        if j == skv.layer:
            n = model.swiftkv_norm(h)
        if j >= skv.layer:
            c = str(skv.group_start(j))
            new = {"k": model.swiftkv_k_proj[c], "v": model.swiftkv_v_proj[c]}
            for kind, y in teacher_kv(model, j, h).items():
                y = y.double()
                err[kind] += float((new[kind](n).double() - y).pow(2).sum())
                total[kind] += float(y.pow(2).sum())
    return {kind: err[kind] / total[kind] if total[kind] else 0.0 for kind in err}
