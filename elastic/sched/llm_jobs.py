"""LLM jobs for the simulator: a model trace measured on glassbox's own model by real glassbox training runs.

The artifact's six models are vision, speech, recommendation and BERT fine-tuning jobs. This module measures a
glassbox LLM (any run config) the same way and writes its trace in the artifact's layout, so the simulator runs it
as one more job type (`glassbox schedule simulate --trace DIR`, or `load_model_trace`):

- Throughput (placements.csv): real glassbox training runs at each world size that fits this machine (gloo ranks
  on CPU, one GPU each with --device cuda) and each local batch, one micro-batch per step; the step time is the
  median of the logged `step_time` after the warm-up steps. The sync time of a 2-rank step is its time beyond a
  1-rank step of the same local batch (what the all-reduce added).
- Larger and multi-node allocations cannot be measured on one machine: scalability.csv holds the agent's
  throughput model (`glassbox.elastic.throughput.fit_throughput`, its priors for cross-node links) fitted to the
  measured steps and evaluated on a grid up to 16 nodes x 4. provenance.json says which rows are measured and
  which predicted.
- Statistical efficiency (validation-<batch>.csv): one real in-process training run at the job's initial batch M0
  with four micro-batches per step; a callback takes each step's micro-batch and global-batch gradient norms
  (the trainer's GradientStats) into the agent's unbiased two-batch estimators and its bias-corrected moving
  average (`glassbox.elastic.gns`), and each "epoch" (a fixed number of samples) records the smoothed |G|^2 and
  tr(Sigma)/M0 at its end. Norms are of the plain gradient (no Adam preconditioning: the trainer's optimizer
  state is not the callback's to read here). Progress is counted in steps at M0, so every batch size's file
  holds the same statistics and epoch boundaries: the simulator derives larger batches' efficiency from them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from glassbox.errors import GlassboxError

WARMUP_STEPS = 2


@dataclass(frozen=True)
class Measurement:
    world_size: int
    local_batch: int
    step_time: float


def _overrides(data: Path, run_dir: Path, steps: int, batch: int, micro: int, extra: tuple[str, ...]) -> list[str]:
    return [f"data.path={json.dumps(str(data))}", f"run_dir={json.dumps(str(run_dir))}", f"schedule.steps={steps}",
            f"schedule.warmup_steps={min(2, steps)}", f"batch.global_batch_size={batch}",
            f"batch.micro_batch_size={micro}", "logging.val_every=0", "logging.progress=false",
            "logging.wandb.mode=disabled", "checkpoint.save_final=false", *extra]


def _config(config: str, overrides: list[str]):
    from glassbox.config import apply_overrides, load_yaml
    from glassbox.train.cli import resolve_config_path
    from glassbox.train.config import run_config_from_dict

    return run_config_from_dict(apply_overrides(load_yaml(resolve_config_path(config)), overrides))


def measure_step_times(config: str, data: Path, world_sizes: tuple[int, ...], local_batches: tuple[int, ...],
                       steps: int, workdir: Path, overrides: tuple[str, ...] = ()) -> list[Measurement]:
    """Median step time of real training runs, one per (world size, local batch): one rank in this process, more
    under torchrun (`glassbox train --nproc`)."""
    from glassbox.train.metrics_log import read_metrics
    from glassbox.train.trainer import Trainer

    out = []
    for world in world_sizes:
        for local in local_batches:
            run_dir = workdir / f"throughput_w{world}_b{local}"
            sets = _overrides(data, run_dir, steps, world * local, local, overrides)
            if world == 1:
                Trainer(_config(config, sets)).fit()
            else:
                cmd = [sys.executable, "-m", "glassbox.cli", "train", "--config", config, "--nproc", str(world)]
                for o in sets:
                    cmd += ["--set", o]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise GlassboxError(f"throughput run (world {world}, local batch {local}) failed:\n"
                                        + "\n".join(done.stderr.splitlines()[-10:]))
            times = [r["step_time"] for r in read_metrics(run_dir, required=True)][WARMUP_STEPS:]
            if not times:
                raise GlassboxError(f"{run_dir}: no steps after the {WARMUP_STEPS} warm-up steps (raise --steps)")
            out.append(Measurement(world, local, statistics.median(times)))
    return out


def measure_noise(config: str, data: Path, init_batch: int, micro_batches: int, epochs: int,
                  steps_per_epoch: int, workdir: Path, overrides: tuple[str, ...] = ()) -> list[tuple[float, float]]:
    """(|G|^2, tr(Sigma)/M0) at the end of each epoch of a real in-process run at batch `init_batch`."""
    import torch

    from glassbox.elastic.gns import NoiseScaleEMA, two_batch_estimates
    from glassbox.train.callbacks import Callback
    from glassbox.train.trainer import Trainer, default_callbacks

    if init_batch % micro_batches:
        raise GlassboxError(f"the initial batch {init_batch} must split into {micro_batches} micro-batches")
    micro = init_batch // micro_batches
    cfg = _config(config, _overrides(data, workdir / "noise", epochs * steps_per_epoch, init_batch, micro,
                                     overrides))

    class NoiseProbe(Callback):
        wants_local_norms = True

        def __init__(self) -> None:
            self.ema = NoiseScaleEMA(init_batch)
            self.per_epoch: list[tuple[float, float]] = []

        def on_after_backward(self, state, grads) -> None:
            small = float(grads.local_sq_norms[0])
            big = float(grads.sq_norm)
            sqr, trace = two_batch_estimates(grads.micro_batch, small, grads.global_batch, big)
            self.ema.update(sqr, trace, grads.global_batch)

        def on_step_end(self, state) -> None:
            if state.step % steps_per_epoch == 0:
                self.per_epoch.append((max(self.ema.grad_sqr, 1e-12), self.ema.grad_var))

    torch.manual_seed(0)
    probe = NoiseProbe()
    Trainer(cfg, callbacks=default_callbacks(cfg) + [probe]).fit()
    return probe.per_epoch


def write_llm_trace(out: Path, measured: list[Measurement], noise: list[tuple[float, float]], init_batch: int,
                    max_batch: int, samples_per_epoch: int, gpus_per_node: int = 4, max_nodes: int = 16,
                    source: dict | None = None) -> Path:
    """Write a trace directory in the artifact's layout from measurements (see the module docstring)."""
    import numpy as np

    from glassbox.atomic import staged_dir, write_json
    from glassbox.elastic.throughput import StepObservation, fit_throughput, predict_step_time

    one = {m.local_batch: m.step_time for m in measured if m.world_size == 1}
    placement_rows = []
    for m in sorted(measured, key=lambda m: (m.world_size, m.local_batch)):
        if m.world_size > gpus_per_node:
            continue
        sync = 0.0 if m.world_size == 1 else max(0.0, m.step_time - one.get(m.local_batch, m.step_time))
        placement_rows.append(f"{m.world_size},{m.local_batch},{m.step_time!r},{min(sync, m.step_time)!r}")
    params = fit_throughput([StepObservation(1, m.world_size, m.local_batch, 1, m.step_time) for m in measured])
    locals_ = sorted({m.local_batch for m in measured})
    scal_rows = []
    for nodes in sorted({1, 2, 4, 8, max_nodes}):
        if nodes > max_nodes:
            continue
        for replicas in sorted({nodes * k for k in range(1, gpus_per_node + 1)}):
            for local in locals_:
                step = predict_step_time(params, nodes, replicas, local, 1)
                compute = predict_step_time(params, 1, 1, local, 1)
                scal_rows.append(f"{nodes},{replicas},{local},{step!r},{min(max(step - compute, 0.0), step)!r}")
    steps_per_epoch = samples_per_epoch / init_batch
    batches = sorted({int(b) for b in np.geomspace(init_batch, max_batch, 4).round()} | {init_batch, max_batch})
    with staged_dir(out, replace=True) as tmp:
        (tmp / "placements.csv").write_text("placement,local_bsz,step_time,sync_time\n"
                                            + "\n".join(placement_rows) + "\n")
        (tmp / "scalability.csv").write_text("num_nodes,num_replicas,local_bsz,step_time,sync_time\n"
                                             + "\n".join(scal_rows) + "\n")
        for batch in batches:
            lines = ["progress,iteration,metric,grad_sqr,grad_var"]
            for e, (sqr, var) in enumerate(noise, start=1):
                lines.append(f"{e * steps_per_epoch!r},{e * samples_per_epoch / batch!r},0,{sqr!r},{var!r}")
            (tmp / f"validation-{batch}.csv").write_text("\n".join(lines) + "\n")
        write_json(tmp / "provenance.json", {
            "measured": "placements.csv rows: real glassbox train runs (median step time after warm-up); "
                        "validation-*.csv grad_sqr/grad_var: one real run's two-batch GNS estimates per epoch",
            "predicted": "scalability.csv: the agent's throughput model fitted to the measured rows",
            "throughput_params": params.to_dict(), "init_batch": init_batch, "max_batch": max_batch,
            "samples_per_epoch": samples_per_epoch, "measurements": [m.__dict__ for m in measured],
            **(source or {})})
    return out


def measure_llm_trace(config: str, data: Path, out: Path, init_batch: int = 8, max_batch: int = 64,
                      local_batches: tuple[int, ...] = (2, 4, 8, 16), world_sizes: tuple[int, ...] = (1, 2),
                      steps: int = 8, epochs: int = 4, steps_per_epoch: int = 5,
                      samples_per_epoch: int | None = None, overrides: tuple[str, ...] = ()) -> Path:
    """Measure `config` on this machine and write its trace to `out` (see the module docstring).

    The noise is measured over `epochs` x `steps_per_epoch` steps; `samples_per_epoch` (default: what those steps
    took) sets how long the simulated job trains per measured epoch, so a few measured steps can stand for a job
    of realistic length with the same noise trajectory."""
    import platform

    with tempfile.TemporaryDirectory(prefix="glassbox-llm-trace-") as tmp:
        work = Path(tmp)
        measured = measure_step_times(config, data, world_sizes, local_batches, steps, work, overrides)
        noise = measure_noise(config, data, init_batch, 4, epochs, steps_per_epoch, work, overrides)
    samples = samples_per_epoch or init_batch * steps_per_epoch
    return write_llm_trace(out, measured, noise, init_batch, max_batch, samples,
                           source={"config": config, "host": platform.node(), "overrides": list(overrides)})
