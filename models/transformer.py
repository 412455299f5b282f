"""A Llama-style decoder (dense or mixture-of-experts), readable top to bottom.

RMSNorm, rotary position embeddings, grouped-query attention through `scaled_dot_product_attention`, SwiGLU MLPs,
and an optional MoE MLP whose routing is Mixtral's (softmax over all experts, top-k, renormalised), so exports
load in transformers' Llama and Mixtral classes with identical math. Module names follow those classes.

The model knows nothing of parallelism: DDP, FSDP2 and tensor parallel are applied from outside
(`glassbox.train.parallel`). Building blocks (`RMSNorm`, `RotaryEmbedding`, `apply_rotary`, `SwiGLU`, `MoE`)
are shared with the inference engine, which runs the same weights with a paged KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.config import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 688
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Mixture of experts: 0 experts means a dense model.
    num_experts: int = 0
    experts_per_token: int = 2
    router_aux_loss_coef: float = 0.01
    # Per-layer expert counts and top-k (an expert-pruned MoE); None: every layer has num_experts and
    # experts_per_token. When given, num_experts is the largest per-layer count (it still marks the model as MoE).
    layer_num_experts: list[int] | None = None
    layer_experts_per_token: list[int] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def experts_in_layer(self, layer: int) -> int:
        """How many experts layer `layer` has (0 for a dense model)."""
        if self.layer_num_experts is not None:
            return self.layer_num_experts[layer]
        return self.num_experts

    def top_k_in_layer(self, layer: int) -> int:
        """How many experts each token uses in layer `layer`."""
        if self.layer_experts_per_token is not None:
            return self.layer_experts_per_token[layer]
        return self.experts_per_token

    @property
    def uniform_experts(self) -> bool:
        """Every layer has the same expert count and top-k (the shape Mixtral's config can describe)."""
        layers = range(self.num_layers)
        return (len({self.experts_in_layer(i) for i in layers}) <= 1
                and len({self.top_k_in_layer(i) for i in layers}) <= 1)

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must divide by model.num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model: head dim {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.num_experts < 0:
            raise ConfigError(f"model.num_experts: must be >= 0, got {self.num_experts}")
        if self.is_moe and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"model.experts_per_token ({self.experts_per_token}) must be in 1..num_experts ({self.num_experts})"
            )
        self._validate_per_layer()
        # Written so that NaN fails too. norm_eps 0 divides a zero vector by zero and rope_theta 0 makes every
        # rotary frequency infinite: both end in a NaN loss, not an error.
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if not self.router_aux_loss_coef >= 0:
            raise ConfigError(f"model.router_aux_loss_coef: must be >= 0, got {self.router_aux_loss_coef}")

    def _validate_per_layer(self) -> None:
        for name in ("layer_num_experts", "layer_experts_per_token"):
            counts = getattr(self, name)
            if counts is None:
                continue
            if not self.is_moe:
                raise ConfigError(f"model.{name}: per-layer expert settings need an MoE model (num_experts > 0)")
            if len(counts) != self.num_layers:
                raise ConfigError(f"model.{name}: has {len(counts)} entries for {self.num_layers} layers")
        if self.layer_num_experts is not None and max(self.layer_num_experts) != self.num_experts:
            raise ConfigError(f"model.num_experts ({self.num_experts}) must equal the largest of "
                              f"model.layer_num_experts ({max(self.layer_num_experts)})")
        if self.is_moe:
            for i in range(self.num_layers):
                experts, top_k = self.experts_in_layer(i), self.top_k_in_layer(i)
                if not 1 <= top_k <= experts:
                    raise ConfigError(f"model: layer {i} routes each token to {top_k} experts, which must be in "
                                      f"1..its expert count ({experts})")

    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count from the shape alone. `active`: only the experts a token uses (MoE FLOPs)."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        kv = self.num_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2
        mlp = 0
        for i in range(L):
            if self.is_moe:
                experts = self.top_k_in_layer(i) if active else self.experts_in_layer(i)
                mlp += experts * 3 * d * f + d * self.experts_in_layer(i)
            else:
                mlp += 3 * d * f
        total = L * (attn + 2 * d) + mlp + d
        if not non_embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding (active) parameters + attention 12 x layers x hidden x seq.

        The 6N term counts forward (2N) and backward (4N) matmuls; the attention term counts QK^T and AV for
        forward and backward without causal halving (the PaLM / nanoGPT convention). The LM head is excluded
        with the embeddings, as in the formula the benchmarks quote.
        """
        n = self.num_params(non_embedding=True, active=True)
        return 6 * n + 12 * self.num_layers * self.hidden_size * seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers' Llama does, so logits match in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary positions (training uses 0..T-1; the inference engine passes its own)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, head_dim]; cos/sin broadcast to it (rotate-half convention, as transformers' Llama)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.register_buffer("qkv_weight", None, persistent=False)     # set by fuse()

    def fuse(self) -> None:
        """Join the Q, K and V weights into one matrix (`qkv_weight`) that the three projections' weights become
        views of: no memory added, one matrix product per step instead of three. It pays where a step is a
        matrix-vector product per weight, serving at small batches: on the H200 a 1B model's decode step ran K
        and V (1 MB each) at 5.3 us apiece, latency rather than bandwidth (bench/results/decode_profile_h200.md).
        Call it after any sharding (tensor parallelism slices the separate projections)."""
        if self.qkv_weight is None:
            self.qkv_weight = join_rows([self.q_proj, self.k_proj, self.v_proj])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K and V of x [..., hidden], each [..., heads x head_dim]: one product once fused (and no gradient is
        being taken: the joined matrix is not what autograd tracks), else three."""
        if self.qkv_weight is None or torch.is_grad_enabled():
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        rows = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        q, k, v = F.linear(x, self.qkv_weight).split(rows, dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 for the head count: under tensor parallelism each rank holds a slice of the heads.
        q, k, v = (t.reshape(B, T, -1, self.head_dim).transpose(1, 2) for t in self.project_qkv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)     # set by fuse()

    def fuse(self) -> None:
        """Join the gate and up weights into one matrix the two become views of (see Attention.fuse)."""
        if self.gate_up_weight is None:
            self.gate_up_weight = join_rows([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None or torch.is_grad_enabled():     # see Attention.project_qkv
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def join_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """One weight matrix of the linears' rows, in order; each linear's weight becomes a view of its rows, so the
    separate modules still compute, train and load (load_state_dict copies into the views) as before, and the old
    tensors are freed. Shard before joining: a shard replaces a weight, which would leave the joined one stale."""
    joined = torch.cat([lin.weight.detach() for lin in linears])
    at = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(joined[at:at + rows], requires_grad=lin.weight.requires_grad)
        at += rows
    return joined


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with a load-balancing auxiliary loss.

    Expert weights are stacked 3-D tensors ([experts, out, in]); tokens are sorted by expert and each expert
    runs one matmul over all its tokens, so the Python loop is over experts, never over tokens.
    Routing is Mixtral's: softmax over all experts in fp32, top-k, weights renormalised to sum to one.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        d, f, E = cfg.hidden_size, cfg.intermediate_size, cfg.experts_in_layer(layer)
        self.num_experts = E
        self.top_k = cfg.top_k_in_layer(layer)
        self.router = nn.Linear(d, E, bias=False)
        self.gate_proj = nn.Parameter(torch.empty(E, f, d))
        self.up_proj = nn.Parameter(torch.empty(E, f, d))
        self.down_proj = nn.Parameter(torch.empty(E, d, f))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, d] -> (router probabilities [N, E] fp32, top-k weights [N, k], top-k expert ids [N, k])."""
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = self.route(x)
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx = token_of[start:start + n]
            h = x[idx]
            h = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            w = weights.reshape(-1)[order[start:start + n]].to(h.dtype)
            # Under autocast h is bf16 while the residual stream (and `out`) stays fp32; index_add_ needs one dtype.
            out.index_add_(0, idx, (h * w[:, None]).to(out.dtype))
            start += n
        # Switch-Transformer balance loss: E * sum_e (fraction of assignments to e) * (mean router prob of e).
        load = counts.float() / flat_experts.numel()
        self.last_aux_loss = self.num_experts * (load * probs.mean(dim=0)).sum()
        self.last_expert_load = load.detach()
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        """`layer`: this block's index, which picks its expert count and top-k in a per-layer (pruned) MoE."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoE(cfg, layer) if cfg.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`attention(h, cos, sin)`, when given, stands in for `self_attn` over the normed input: the inference
        engine passes its paged-KV attention, so training and serving share this one definition of the block
        (norm, attention, residual, norm, MLP, residual) instead of each spelling it out."""
        attend = self.self_attn if attention is None else attention
        x = x + attend(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            self.init_parameter(name, p)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor) -> None:
        """Fill `t`, parameter `name` or a full-size tensor standing in for it, drawing from the global torch RNG.

        Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers) (GPT-2); norms 1.
        """
        std = self.config.init_std
        if name.endswith("layernorm.weight") or name == "norm.weight":
            t.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down_proj")):
            nn.init.normal_(t, std=std / math.sqrt(2 * self.config.num_layers))
        else:
            nn.init.normal_(t, std=std)

    def materialize(self, device: str | torch.device) -> Transformer:
        """Make a model built under `torch.device("meta")` usable on `device`; returns it.

        Parameters still on the meta device get storage there, uninitialised (fill them, or load into them);
        parameters already given storage (`load_state_dict(assign=True)`) are kept. Either way the LM head is
        re-tied to the embedding (both `to_empty` and assignment replace the shared Parameter with two) and the
        rotary table, a non-persistent buffer no state dict carries, is recomputed as the eager build computes it
        and moved to `device`.
        """
        on_meta = [p.is_meta for p in self.parameters()]
        if any(on_meta):
            if not all(on_meta):
                raise ValueError("materialize: some parameters are on the meta device and some are not")
            self.to_empty(device=device)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(self.config.head_dim, self.config.rope_theta).to(device)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (in the compute dtype; the loss upcasts)."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(torch.arange(T, device=input_ids.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def fuse_projections(self) -> None:
        """Join each layer's Q/K/V weights and a dense MLP's gate/up weights (Attention.fuse, SwiGLU.fuse), as the
        inference engine does; values and state_dict keys are unchanged, and a forward that takes gradients still
        runs the separate projections. MoE experts stay as they are."""
        for layer in self.layers:
            layer.self_attn.fuse()
            if isinstance(layer.mlp, SwiGLU):
                layer.mlp.fuse()

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE load-balancing loss of the last forward, summed over layers and scaled; None for dense."""
        if not self.config.is_moe:
            return None
        return self.config.router_aux_loss_coef * sum(layer.mlp.last_aux_loss for layer in self.layers)

    def expert_load(self) -> torch.Tensor | None:
        """Each expert's share of its layer's routed assignments in the last forward, over the balanced share
        (1.0 = balanced), all layers' experts in one flat tensor: layers of a pruned model differ in expert count."""
        if not self.config.is_moe:
            return None
        return torch.cat([layer.mlp.last_expert_load * layer.mlp.num_experts for layer in self.layers])


def unwrap(model: nn.Module) -> Transformer:
    """The Transformer inside a DDP wrapper (FSDP2 and TP keep the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, Transformer) else model
