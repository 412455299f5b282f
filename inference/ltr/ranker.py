"""The ranker: the served model's own first layers, pooled, and a small head that scores a prompt's shortness.

Why the served model's early layers rather than a separately trained decoder: they already read the prompt the
way the model that will answer it does, so a few hundred labelled prompts are enough to train the head on them,
where a decoder trained from scratch on the same few hundred would learn little; and they cost a fraction of a
prefill (k of the model's layers over the prompt, once). The trunk is frozen; only the head learns.

A prompt's features are the mean and the last position of the hidden state after layer k (right-padded batches:
causal attention leaves the real positions unchanged), standardised with the training set's statistics. A
higher score means a shorter expected output (ListMLE's convention: the first of a ranked list scores highest).

Scores rank; they are not lengths. So that a scheduler can also ask how much work a request is (is a preemption
worth it?), training stores a length calibration in ranker.json: the score and output-length quantiles of the
training prompts, matched (the highest score to the shortest length), read back by piecewise-linear
interpolation. It is monotone, so it never changes the ranking; a ranker without one predicts no lengths.

A ranker directory is self-contained: ranker.json (its shape, the layer count, the tokenizer fingerprint it was
trained under), trunk.safetensors (embeddings and k layers) and head.safetensors (head and feature statistics).
It refuses to serve a model whose tokenizer differs: its token ids would mean other words.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from glassbox.atomic import staged_dir, write_json
from glassbox.errors import GlassboxError
from glassbox.models.transformer import Block, ModelConfig, RotaryEmbedding, Transformer

FORMAT = "glassbox-ltr-ranker/1"
# Scoring pads a batch's prompt length to a multiple of this (and its rows to a power of two): a few shapes,
# reused call after call.
SCORE_PAD = 64


class Trunk(nn.Module):
    """Embeddings and the first `cfg.num_layers` decoder layers of a model; returns pooled features per layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    @classmethod
    def from_model(cls, model: Transformer | Trunk, num_layers: int) -> "Trunk":
        """The first `num_layers` layers of `model` (a full model, or a deeper trunk), sharing its tensors."""
        if not 1 <= num_layers <= model.config.num_layers:
            raise GlassboxError(f"ltr ranker: layers must be in 1..{model.config.num_layers}, got {num_layers}")
        cfg = dataclasses.replace(model.config, num_layers=num_layers)
        with torch.device("meta"):
            trunk = cls(cfg)
        sd = {k: v for k, v in model.state_dict().items()
              if k.startswith("embed_tokens.") or (k.startswith("layers.") and int(k.split(".")[1]) < num_layers)}
        trunk.load_state_dict(sd, strict=True, assign=True)
        trunk.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(next(model.parameters()).device)
        return trunk.eval()

    @torch.inference_mode()
    def features(self, prompts: list[list[int]], layers: list[int], max_tokens: int,
                 pad_to: int | None = None) -> dict[int, torch.Tensor]:
        """{layer: [len(prompts), 2 x hidden]} float32 features after each of `layers` (1-based), each prompt cut
        to its last `max_tokens` tokens (the question sits at the end of a chat prompt).

        `pad_to` rounds the padded length up to a multiple of it and the batch up to a power of two (rows of one
        token, dropped), so that calls of varying sizes repeat a few shapes: the caching allocator's blocks and
        the kernels' choices are then reused (causal attention leaves the real positions unchanged). The ids
        are built on the host and copied to the device in one transfer."""
        device = self.embed_tokens.weight.device
        n = len(prompts)
        cut = [p[-max_tokens:] for p in prompts]
        longest = max(len(p) for p in cut)
        T, rows = longest, n
        if pad_to is not None:
            T, rows = -(-longest // pad_to) * pad_to, 1 << (n - 1).bit_length()
        host = torch.zeros(rows, T, dtype=torch.long)
        for i, p in enumerate(cut):
            host[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = host.to(device, non_blocking=True)
        lengths = torch.tensor([len(p) for p in cut] + [1] * (rows - n)).to(device, non_blocking=True)
        valid = (torch.arange(T, device=device)[None, :] < lengths[:, None]).unsqueeze(-1)
        x = self.embed_tokens(ids)
        cos, sin = self.rotary(torch.arange(T, device=device), x.dtype)
        out = {}
        for i, layer in enumerate(self.layers, 1):
            x = layer(x, cos, sin)
            if i in layers:
                h = x.float()
                mean = (h * valid).sum(1) / lengths[:, None]
                last = h[torch.arange(rows, device=device), lengths - 1]
                out[i] = torch.cat([mean, last], dim=-1)[:n]
            if i >= max(layers):
                break
        return out


class Head(nn.Module):
    """Standardise the features, then a one-hidden-layer MLP to one score."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp((feats - self.mean) / self.std).squeeze(-1)


class Ranker:
    """A trunk and a head: `score(prompts)` -> one float per prompt, higher for a shorter expected output."""

    def __init__(self, trunk: Trunk, head: Head, meta: dict):
        self.trunk = trunk
        self.head = head
        self.meta = meta
        self.layers = meta["layers"]
        self.max_prompt_tokens = meta["max_prompt_tokens"]

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], batch_size: int = 32) -> list[float]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))     # similar lengths pad less
        out = [0.0] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            feats = self.trunk.features([prompts[i] for i in chunk], [self.layers], self.max_prompt_tokens,
                                        pad_to=SCORE_PAD)
            for i, s in zip(chunk, self.head(feats[self.layers].to(self.head.mean.device)).tolist()):
                out[i] = s
        return out

    def warm_up(self, batch_size: int = 32) -> list[tuple[int, int]]:
        """Score one batch of every shape serving can ask for (rows a power of two up to `batch_size`, lengths
        multiples of SCORE_PAD up to max_prompt_tokens) and return those (rows, length) shapes. A shape's first
        call pays for allocator growth and kernel selection; on the H200 a ranker that met traffic cold cost
        31 ms a scored request at the first load of bench/ltr_scheduling.py, 19 at the second and 9 at the third,
        the same ranker warming up under requests. Serving on CUDA warms it at start-up instead
        (LTRPolicy.build)."""
        lengths = range(SCORE_PAD, -(-self.max_prompt_tokens // SCORE_PAD) * SCORE_PAD + 1, SCORE_PAD)
        rows = [1 << i for i in range((max(1, batch_size) - 1).bit_length() + 1)]
        shapes = [(n, t) for t in lengths for n in rows]
        for n, t in shapes:
            self.trunk.features([[0] * t] * n, [self.layers], self.max_prompt_tokens, pad_to=SCORE_PAD)
        return shapes

    def predicted_lengths(self, scores: list[float]) -> list[float] | None:
        """Output lengths (tokens) for `scores` through the stored calibration, or None without one."""
        cal = self.meta.get("length_calibration")
        if cal is None:
            return None
        return [interpolate_length(s, cal["scores"], cal["lengths"]) for s in scores]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        with staged_dir(path, replace=True) as tmp:
            for name, module in (("trunk", self.trunk), ("head", self.head)):
                tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(tensors, str(tmp / f"{name}.safetensors"))
            write_json(tmp / "ranker.json", {**self.meta, "format": FORMAT,
                                             "model_config": dataclasses.asdict(self.trunk.config)})

    @classmethod
    def load(cls, path: Path, device: str = "cpu", served_tokenizer=None) -> "Ranker":
        """Load a ranker directory. With `served_tokenizer` (the served model's Tokenizer), refuse a ranker trained
        under another tokenizer."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path / "ranker.json"
        if not meta_path.is_file():
            raise GlassboxError(f"ltr ranker {path}: no ranker.json (not a directory `glassbox ltr train` wrote)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise GlassboxError(f"ltr ranker {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if served_tokenizer is not None:
            check_tokenizer(meta, served_tokenizer, path)
        cfg = ModelConfig(**meta["model_config"])
        with torch.device("meta"):
            trunk = Trunk(cfg)
        trunk.load_state_dict(load_file(str(path / "trunk.safetensors"), device=device), strict=True, assign=True)
        trunk.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(device)
        head = Head(2 * cfg.hidden_size, meta["head_hidden"])
        head.load_state_dict(load_file(str(path / "head.safetensors"), device=device))
        return cls(trunk.eval(), head.to(device).eval(), meta)


def check_tokenizer(meta: dict, served_tokenizer, where: Path | str) -> None:
    """Raise a GlassboxError unless the ranker's tokenizer is the served model's."""
    if served_tokenizer is None:
        raise GlassboxError(f"ltr ranker {where}: the served model has no tokenizer.json, so the ranker's "
                            "tokenizer cannot be checked against it")
    served = served_tokenizer.fingerprint()
    if meta.get("tokenizer_fingerprint") != served:
        raise GlassboxError(
            f"ltr ranker {where} was trained under tokenizer {str(meta.get('tokenizer_fingerprint'))[:12]}... "
            f"(from {meta.get('base_model', '?')}), but the served model's tokenizer is {served[:12]}...: its "
            "token ids would mean other text to the ranker. Train a ranker on this model's outputs "
            "(`glassbox ltr collect` then `glassbox ltr train`)")


def length_calibration(scores: list[float], lengths: list[int], points: int = 33) -> dict[str, list[float]]:
    """Matched quantiles: `points` scores from the highest down and lengths from the shortest up, at the same
    fractions of the training set (a monotone map from score to length)."""
    if len(scores) != len(lengths) or len(scores) < 2:
        raise GlassboxError(f"ltr ranker: a length calibration needs two or more scored prompts with lengths, got "
                            f"{len(scores)} scores and {len(lengths)} lengths")
    hi_first, short_first = sorted(scores, reverse=True), sorted(lengths)
    n = len(scores)
    picks = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
    return {"scores": [float(hi_first[i]) for i in picks], "lengths": [float(short_first[i]) for i in picks]}


def interpolate_length(score: float, scores: list[float], lengths: list[float]) -> float:
    """The calibrated length at `score` (`scores` descending, `lengths` ascending), clamped at both ends."""
    if score >= scores[0]:
        return lengths[0]
    for i in range(1, len(scores)):
        if score >= scores[i]:
            span = scores[i - 1] - scores[i]
            t = (scores[i - 1] - score) / span if span > 0 else 1.0
            return lengths[i - 1] + t * (lengths[i] - lengths[i - 1])
    return lengths[-1]
