"""`--experts-keep auto`: STUN's fraction of experts to keep, chosen per model on held-out calibration tokens.

How much of the target sparsity S should go as whole experts is a property of the model, not a constant: on the
H200 MoE, keeping 1 - 0.25 x S of the experts (a share tuned on another model) lost to Wanda alone at S = 0.4,
because the experts it dropped cost more than the Wanda sparsity they saved, and won at 0.5 and 0.6. Any
prediction of that trade from proxies (merge distances against sums of |W| x ||X|| scores) has to put an expert's
rerouted output and a weight's output perturbation on one scale, and their effect on the loss differs from layer
to layer (the first layer's token specialists), so the rule here measures the loss instead.

The rule: the calibration windows are split into a fit part (3/4) and a held-out part (every fourth window, at
least one). Candidate fractions are keep = 1 - share x S for share in CANDIDATE_SHARES, which spans
[1 - S, 1]: share 0 is keep = 1.0, plain Wanda at S, so "drop no expert" is always a possible answer, and share 1
is expert pruning alone. Candidates with the same expert count are scored once, and those below the layers' top-k
total are skipped. Each candidate is pruned by STUN in full (stage 1 from one shared co-selection pass over the fit
part, then Wanda calibrated on the fit part) and scored by its next-token loss on each held-out window; a candidate
can displace keep = 1 only by a gain over it larger than SIGNIFICANCE_Z paired standard errors, and among those
and keep = 1 the lowest loss wins, ties going to the larger fraction (fewer experts dropped). The caller then
prunes at the chosen fraction with all the windows. Forward passes: the shared stage-1 pass, plus per candidate
one Wanda pass and one loss evaluation: a fixed number, whatever the expert count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from glassbox.errors import GlassboxError
from glassbox.models.loss import window_next_token_losses
from glassbox.models.transformer import Transformer

# Shares of the target sparsity taken as whole experts; denser near 0, where the measured optima lie.
CANDIDATE_SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
HELD_OUT_EVERY = 4                      # a quarter of the calibration windows scores the candidates
SIGNIFICANCE_Z = 2.0                    # standard errors a candidate's held-out gain must exceed (~2% one-sided)


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held out): every HELD_OUT_EVERY-th window, counting back from the last, is held out (at least one).
    Interleaved rather than a tail, since the windows are in corpus order and a corpus's sources come in runs."""
    n = windows.shape[0]
    if n < 2:
        raise GlassboxError(f"--experts-keep auto: needs at least 2 calibration windows (one to fit, one to score), "
                            f"got {n}")
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.arange(n - 1, -1, -HELD_OUT_EVERY)] = True
    return windows[~held], windows[held]


def candidate_keeps(sparsity: float, total: int, floor: int) -> list[float]:
    """The candidate fractions, largest first, one per distinct expert count, none below `floor` experts."""
    keeps, counts = [], set()
    for share in CANDIDATE_SHARES:
        keep = 1.0 - share * sparsity
        count = round(keep * total)
        if count >= floor and count not in counts:
            keeps.append(keep)
            counts.add(count)
    return keeps


def choose_keep(prune_at: Callable[[float], Transformer], held_out: torch.Tensor, keeps: list[float],
                batch_size: int) -> tuple[float, dict]:
    """The fraction in `keeps` chosen on `held_out` (see `significant_best`), and the search's record: each
    candidate's fraction, expert count, held-out loss, and gain over the largest fraction with its standard error."""
    started = time.perf_counter()
    scored, losses = [], []
    for keep in keeps:
        model = prune_at(keep)
        per_window = window_next_token_losses(model, held_out, batch_size)
        scored.append({"keep": keep, "experts": sum(layer.mlp.num_experts for layer in model.layers),
                       "heldout_loss": float(per_window.mean())})
        losses.append(per_window)
        del model
    best = significant_best(scored, losses)
    return scored[best]["keep"], {
        "rule": f"lowest held-out loss among the candidates whose gain over keep {max(keeps):g} exceeds "
                f"{SIGNIFICANCE_Z:g} paired standard errors",
        "chosen": scored[best]["keep"], "candidates": scored, "held_out_windows": int(held_out.shape[0]),
        "loss_evaluations": len(keeps), "seconds": time.perf_counter() - started}


def candidate_losses(search: dict) -> dict[str, float]:
    """A search record's held-out loss per candidate fraction, keyed by the fraction as text ("0.95")."""
    return {f"{c['keep']:g}": c["heldout_loss"] for c in search["candidates"]}


def significant_best(scored: list[dict], losses: list[torch.Tensor]) -> int:
    """The index of the chosen candidate. The reference is the largest fraction (fewest experts dropped: at 1.0,
    Wanda alone); another candidate can displace it only if its per-window gain over the reference, window by
    window on the same held-out windows, exceeds SIGNIFICANCE_Z standard errors of that mean gain. Among the
    reference and those, the lowest mean loss wins (ties: the larger fraction). On the H200 MoE at S = 0.4 the
    plain lowest mean chose 0.95 over 1.0 by 0.01% of held-out loss, and lost to Wanda on validation by 0.02%;
    on the CPU MoE it dropped experts at S = 0.2 and 0.3 on gains the validation split reversed. Each candidate's
    record gets its
    `gain` and `gain_se` (nats; the reference's are 0)."""
    ref = max(range(len(scored)), key=lambda i: scored[i]["keep"])
    n = losses[ref].numel()
    allowed = []
    for i, c in enumerate(scored):
        diff = losses[ref] - losses[i]
        c["gain"] = float(diff.mean())
        c["gain_se"] = float(diff.std() / math.sqrt(n)) if n > 1 else math.inf
        if i == ref or c["gain"] > SIGNIFICANCE_Z * c["gain_se"]:
            allowed.append(i)
    return min(allowed, key=lambda i: (scored[i]["heldout_loss"], -scored[i]["keep"]))
