"""SwiftKV distillation as a training objective (ALGORITHMS.md, SwiftKV): the `distill:` section of a run config.

The run starts (`init_from`) from a SwiftKV directory, which holds the base weights and the transform's. The
teacher is the same model with the transform off (`forward_hidden(ids, swiftkv=False)`, no gradient); the student
is the transformed model, of which only the new tensors (`swiftkv_*`) train. The loss per response token is
T^2 x KL(teacher || student) of the logits at temperature T, plus a weight x the MSE of the hidden states entering
the last layer. Response tokens are the ones after `response_marker` (the text that opens the teacher's answer,
e.g. SmolLM2's "<|im_start|>assistant\n") up to the end of their document; with no marker, every token counts.
Everything else (data order, checkpoints, metrics, resume) is an ordinary run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.models.swiftkv import SwiftKVTransformer
from glassbox.models.transformer import unwrap


@dataclass
class DistillConfig:
    enabled: bool = False
    temperature: float = 2.0         # T of the KL term (both distributions softened by it)
    kl_weight: float = 1.0           # the KL term is kl_weight x T^2 x KL(teacher || student)
    hidden_mse_weight: float = 1.0   # x MSE between the student's and the teacher's hidden states entering the
                                     # last layer ("second-to-last hidden states")
    response_marker: str = ""        # text opening each response; "" = every token is a response token

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature: must be positive, got {self.temperature}")
        for name in ("kl_weight", "hidden_mse_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"distill.{name}: must be >= 0, got {getattr(self, name)}")
        if self.enabled and self.kl_weight == 0 and self.hidden_mse_weight == 0:
            raise ConfigError("distill: kl_weight and hidden_mse_weight are both 0 (nothing to train)")


def response_mask(tokens: torch.Tensor, marker: list[int], eod_id: int) -> torch.Tensor:
    """[B, T] bool: which positions of `tokens` are response tokens, i.e. come after a complete `marker` (token
    ids) and not after a later end-of-document. A window that begins inside a response, its marker cut off,
    counts nothing until the next marker. No marker: every position."""
    if not marker:
        return torch.ones_like(tokens, dtype=torch.bool)
    B, T = tokens.shape
    m = len(marker)
    hit = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
    if T >= m:
        windows = tokens.unfold(1, m, 1)                                 # [B, T - m + 1, m]
        ends = (windows == torch.tensor(marker, device=tokens.device)).all(-1)
        hit[:, m - 1:] = ends                                            # the marker's last token is at t
    pos = torch.arange(T, device=tokens.device).expand(B, T)
    last_marker = torch.where(hit, pos, -1).cummax(1).values
    last_eod = torch.where(tokens == eod_id, pos, -1).cummax(1).values
    # After the marker's last token, through the end-of-document token (the teacher produced that too).
    inside = (last_marker >= 0) & (pos > last_marker) & ((last_eod <= last_marker) | (last_eod == pos))
    return inside


def distill_losses(model: SwiftKVTransformer, chunk: torch.Tensor, mask: torch.Tensor, cfg: DistillConfig,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL term, hidden MSE term), each a mean over the response positions of `chunk[:, :-1]` (the inputs)."""
    inputs = chunk[:, :-1]
    with torch.no_grad(), autocast():
        t_logits, t_hidden = model.forward_hidden(inputs, swiftkv=False)
    with autocast():
        s_logits, s_hidden = model.forward_hidden(inputs)
    count = mask.sum().clamp(min=1)
    T = cfg.temperature
    t_logp = F.log_softmax(t_logits.float() / T, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / T, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)                    # [B, T]: KL(teacher || student)
    kl = (kl * mask).sum() / count * T * T
    mse = ((s_hidden.float() - t_hidden.float()).pow(2).mean(-1) * mask).sum() / count
    return kl, mse


class DistillObjective:
    """The trainer's objective for a distillation run: chunk [B, T + 1] -> the loss to minimise. It also keeps
    the step's two terms apart (`step_terms`) and scores held-out samples by their KL (`validation_sums`), the
    metric a distillation is after; the student's cross-entropy on all tokens says little about it."""

    def __init__(self, cfg: DistillConfig, marker: list[int], eod_id: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.cfg, self.marker, self.eod_id, self.autocast = cfg, marker, eod_id, autocast
        self._terms: torch.Tensor | None = None     # sum over the step's micro-batches of [kl, mse] x rows
        self._rows = 0

    def __call__(self, model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
        mask = response_mask(chunk[:, 1:], self.marker, self.eod_id)    # the positions whose next token is scored
        kl, mse = distill_losses(unwrap_swiftkv(model), chunk, mask, self.cfg, self.autocast)
        terms = torch.stack([kl.detach(), mse.detach()]) * chunk.shape[0]
        self._terms = terms if self._terms is None else self._terms + terms
        self._rows += chunk.shape[0]
        return self.cfg.kl_weight * kl + self.cfg.hidden_mse_weight * mse

    def step_terms(self) -> torch.Tensor:
        """[KL term (T^2 x KL), hidden-state MSE] of the micro-batches since the last call, weighted by their rows
        as the step's loss is, on the device (no sync); the trainer takes them once a step, for metrics."""
        if self._terms is None:
            raise GlassboxError("distill: step_terms called before any micro-batch of the step")
        terms, self._terms = self._terms / self._rows, None
        self._rows = 0
        return terms

    def validation_sums(self, model: nn.Module, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """[summed KL(teacher || student) at T = 1, response-token count] over held-out samples [N, T + 1] on
        the model's device (float64, no sync): the validation metric of a distillation run."""
        return kl_sums(unwrap_swiftkv(model), tokens, self.marker, self.eod_id, self.autocast, batch=batch)


def unwrap_swiftkv(model: nn.Module) -> SwiftKVTransformer:
    inner = model.module if hasattr(model, "module") and isinstance(model.module, SwiftKVTransformer) else model
    if not isinstance(inner, SwiftKVTransformer):
        raise GlassboxError("distill: the model is not a SwiftKV model (set init_from to a directory written by "
                            "`glassbox swiftkv convert`)")
    return inner


def train_only_swiftkv(model: nn.Module) -> list[str]:
    """Freeze every parameter but the transform's new ones; returns the names left trainable."""
    names = []
    for name, p in unwrap(model).named_parameters():
        trainable = name.startswith("swiftkv_")
        p.requires_grad_(trainable)
        if trainable:
            names.append(name)
    if not names:
        raise GlassboxError("distill: the model has no SwiftKV parameters to train (converted with --layer L?)")
    return names


def marker_ids(tokenizer, marker: str) -> list[int]:
    """The token ids of `response_marker` under the data's tokenizer (a `tokenizers.Tokenizer`), without its
    trailing whitespace: a byte-level BPE merges the marker's final newline with a response that opens with
    more whitespace ("\n" + "\n\nSure" is one "\n\n\n" token), and the marker would not be found. The
    stripped newline then counts as a response token, one template token per document."""
    if not marker:
        return []
    return tokenizer.encode(marker.rstrip() or marker, add_special_tokens=False).ids


@torch.no_grad()
def kl_sums(model: SwiftKVTransformer, tokens: torch.Tensor, marker: list[int], eod_id: int,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
            temperature: float = 1.0, batch: int = 8) -> torch.Tensor:
    """[summed KL(teacher || student) per response token at `temperature`, response-token count] over samples
    [N, T + 1], float64 on the model's device."""
    device = model.embed_tokens.weight.device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    cfg = DistillConfig(temperature=temperature)
    for chunk in tokens.split(batch):
        chunk = chunk.to(device)
        mask = response_mask(chunk[:, 1:], marker, eod_id)
        kl, _ = distill_losses(model, chunk, mask, cfg, autocast)
        n = mask.sum()
        total += torch.stack([kl.double() / (temperature * temperature) * n, n.double()])
    return total


def heldout_kl(model: SwiftKVTransformer, tokens: torch.Tensor, marker: list[int], eod_id: int,
               temperature: float = 1.0, batch: int = 8) -> float:
    """Mean KL(teacher || student) per response token over held-out samples [N, T + 1] (T = 1: the plain KL)."""
    total, count = kl_sums(model, tokens, marker, eod_id, temperature=temperature, batch=batch).tolist()
    if count == 0:
        raise GlassboxError("heldout_kl: no response tokens in the held-out samples (is response_marker right?)")
    return total / count
