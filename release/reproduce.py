"""`glassbox reproduce`: replay training from the checkpoint before step N to step N and compare with checkpoint N.

The replay is the real Trainer on the run's resolved config, restored from the previous checkpoint (or from the
seeded initialisation when N is the first checkpoint), taking each step as the data-order log recorded it (its
batch size, micro-batch, LR scale and progress: a `ReplayPlan`), so a run whose plan adapted replays exactly. Before each step it checks that the sampler stands where
the data-order log says and that the batch it will take hashes to the logged value, so a replay on other data
stops at the first wrong batch instead of reporting a meaningless difference. After step N every tensor (weights
and optimizer state) is compared with checkpoint N: "bit-exact" when all are identical, else the largest
absolute difference; the replayed loss of step N is compared with the logged one. A SCAR partial recovery
recorded in the run's manifest is re-applied right after its step (the same blocks from the same sources and
steps), so a run that lost ranks replays bit-exactly too (at the run's world size: `torchrun --nproc-per-node W
-m glassbox.cli reproduce ...`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glassbox.errors import GlassboxError
from glassbox.release.layout import ReleaseLayout, branch_step
from glassbox.release.run_reader import list_checkpoints
from glassbox.train.metrics_log import read_metrics


@dataclass
class ReplaySource:
    """Where the config, checkpoints, data order, metrics and data come from (a run or a release)."""

    config_text: str
    checkpoints: dict[int, Path]
    order_dir: Path                    # the directory holding data_order.zarr
    metrics: list[dict[str, Any]]
    data_paths: list[str] | None       # None: the paths in the config
    run_dir: Path | None = None        # a run's directory: its SCAR store and recorded recoveries
    recoveries: dict[int, dict[str, Any]] = field(default_factory=dict)   # partial recoveries by failure step


def from_run(run_dir: Path) -> ReplaySource:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise GlassboxError(f"{config} is missing: not a glassbox run directory")
    from glassbox.fault_tolerance.events import partial_events

    return ReplaySource(config.read_text(), list_checkpoints(run_dir), run_dir,
                        read_metrics(run_dir / "metrics.jsonl", required=True),
                        None, run_dir, partial_events(run_dir))


def from_release(release_dir: Path) -> ReplaySource:
    layout = ReleaseLayout(release_dir)
    index = layout.read_index()
    checkpoints = {}
    for b in index["branches"]:
        state = layout.training_state(b["branch"])
        if not state.is_dir():
            raise GlassboxError(f"{state} is missing: this release carries no training state to replay from")
        checkpoints[branch_step(b["branch"])] = state
    config = layout.model / "reproduce" / "config.yaml"
    if not config.is_file():
        raise GlassboxError(f"{config} is missing: the release holds no config to replay with")
    data_paths = [str((layout.dataset / name).resolve()) for name in index["stores"]]
    return ReplaySource(config.read_text(), checkpoints, layout.dataset,
                        read_metrics(layout.model / "metrics" / "metrics.jsonl", required=True), data_paths)


@dataclass
class ReproduceResult:
    step: int
    from_step: int
    bit_exact: bool
    max_abs_diff: float
    tensors_compared: int
    tensors_differing: list[str] = field(default_factory=list)
    loss_replayed: float | None = None
    loss_logged: float | None = None

    @property
    def loss_diff(self) -> float | None:
        if self.loss_replayed is None or self.loss_logged is None:
            return None
        return abs(self.loss_replayed - self.loss_logged)


def _flat_tensors(trainer) -> dict[str, Any]:
    """Every tensor of the model and optimizer, as full CPU copies keyed by a readable name."""
    import torch

    from glassbox.distributed import full_tensor
    from glassbox.models.transformer import unwrap

    def full(t):
        return full_tensor(t).detach().cpu().clone()

    model = unwrap(trainer.state.model)
    out = {f"model.{k}": full(v) for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in trainer.state.optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optimizer.{names.get(id(p), id(p))}.{k}"] = full(v)
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float, list[str]]:
    import torch

    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())
        raise GlassboxError(f"the replayed state and the checkpoint hold different tensors (e.g. {missing[0]})")
    worst, differing = 0.0, []
    for k in sorted(a):
        if not torch.equal(a[k], b[k]):
            differing.append(k)
            if a[k].shape == b[k].shape:
                worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
            else:
                worst = float("inf")
    return not differing, worst, differing


def _check_batch(sampler, order_log, step: int) -> None:
    from glassbox.data.order_log import check_logged_batch

    row = order_log.row(step)
    if sampler.cursor != int(row["cursor_start"]):
        raise GlassboxError(
            f"step {step}: the sampler is at sample {sampler.cursor} but the data-order log says {row['cursor_start']}"
        )
    check_logged_batch(sampler.samples(int(row["cursor_start"]), int(row["batch_size"])), row, "the run's data")


def _replay(trainer, source: ReplaySource, order_log, start: int, step: int) -> tuple[dict[str, Any], dict]:
    """Restore `start` (0: the seeded initialisation) and run the real training steps up to `step`."""
    from tqdm import tqdm

    from glassbox.release.training import load_into

    if start:
        load_into(trainer, source.checkpoints[start])
    if trainer.state.step != start:
        raise GlassboxError(f"{source.checkpoints.get(start, 'the initial state')} holds step "
                            f"{trainer.state.step}, expected {start}")
    metrics: dict[str, Any] = {}
    for s in tqdm(range(start + 1, step + 1), desc=f"replay {start}->{step}", unit="step"):
        _check_batch(trainer.state.sampler, order_log, s)
        metrics = trainer.train_step()
        if s in source.recoveries:      # the run lost ranks after step s: the same blocks, restored the same way
            from glassbox.fault_tolerance.events import reapply

            reapply(trainer.state.model, trainer.state.optimizer, source.recoveries[s], source.run_dir,
                    trainer.world.rank, trainer.world.world_size)
    return _flat_tensors(trainer), metrics


def reproduce(source: ReplaySource, step: int) -> ReproduceResult:
    from glassbox.data.order_log import DataOrderLog
    from glassbox.release.training import load_into, scratch_trainer
    from glassbox.train.step_plan import ReplayPlan

    if step not in source.checkpoints:
        have = ", ".join(map(str, source.checkpoints)) or "none"
        raise GlassboxError(f"no checkpoint at step {step} to compare with (checkpoints: {have})")
    earlier = [s for s in source.checkpoints if s < step]
    start = max(earlier) if earlier else 0
    order_log = DataOrderLog(source.order_dir, read_only=True)
    if len(order_log) < step:
        raise GlassboxError(f"{order_log.path} has {len(order_log)} steps; step {step} is not logged")
    logged = {int(r["step"]): float(r["loss"]) for r in source.metrics if "step" in r and "loss" in r}
    with tempfile.TemporaryDirectory(prefix="glassbox-reproduce-") as work:
        # The trainer logs each step it takes; give it the run's log up to the starting step to append to.
        shutil.copytree(order_log.path, Path(work) / order_log.path.name)
        DataOrderLog(work).truncate(start)
        # One step past `step` too, where the log has it: the trainer reads ahead to prefetch that batch.
        replayed_steps = range(start + 1, min(step + 1, len(order_log)) + 1)
        plan = ReplayPlan({s: order_log.plan_row(s) for s in replayed_steps}, 1)
        trainer = scratch_trainer(source.config_text, Path(work), source.data_paths, plan)
        replayed, metrics = _replay(trainer, source, order_log, start, step)
        load_into(trainer, source.checkpoints[step])
        exact, worst, differing = _compare(replayed, _flat_tensors(trainer))
    result = ReproduceResult(step, start, exact, worst, len(replayed), differing,
                             float(metrics["loss"]) if "loss" in metrics else None, logged.get(step))
    if result.loss_diff:
        result.bit_exact = False
    return result


def format_result(r: ReproduceResult) -> str:
    loss = ""
    if r.loss_replayed is not None and r.loss_logged is not None:
        loss = f"; loss replayed {r.loss_replayed:.8g} vs logged {r.loss_logged:.8g} (diff {r.loss_diff:.3g})"
    if r.bit_exact:
        return (f"bit-exact: replayed steps {r.from_step + 1}..{r.step}; "
                f"all {r.tensors_compared} tensors identical{loss}")
    shown = ", ".join(r.tensors_differing[:5]) + (" ..." if len(r.tensors_differing) > 5 else "")
    return (f"not bit-exact: replayed steps {r.from_step + 1}..{r.step}; {len(r.tensors_differing)} of "
            f"{r.tensors_compared} tensors differ (max abs diff {r.max_abs_diff:.3g}: {shown}){loss}")
