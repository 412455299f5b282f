"""SCAR with a real `kill -9`: one cell per strategy under torchrun, beside the same cell applied in process.

Every run is the real trainer under `torchrun --nproc-per-node 2` (gloo, CPU, the tiny model of
bench/scar_rework.py), with SCAR's callback, full checkpoints every C steps and validation every few steps:
  reference              no failure
  <strategy>, kill9      rank 1 is killed with SIGKILL at the start of step F + 1 (its node-local copies
                         wiped); torchrun restarts both ranks (--max-restarts=1) and the run recovers as
                         `fault_tolerance.recovery` says: full (rollback to the checkpoint; steps c+1..F
                         trained again) or partial (survivor keeps its state; rank 1's blocks from the block
                         store or the checkpoint)
  <strategy>, in process the same cell without the kill: at the start of step F + 1 rank 1's blocks are restored
                         in place through the same recovery code and sources (`inject: ...,in_process`)
Strategies: full, partial (no block store: the lost blocks from the last full checkpoint), and partial +
prioritized / round_robin / random (a fraction r of each rank's blocks every r*C steps, the I/O of a full
checkpoint every C steps; full checkpoints are kept too, as the fallback source).

Rework is measured as bench/scar_rework.py measures it, with its `measure_rework` on the runs' logged
validation losses (`LoggedRun`); the first evaluation after the failure is at F + val_every (the logged loss
at F is the state before the failure), so rework here starts counting at val_every. Full rollback's rework is
its F - c redone steps, as there.

Agreement: the kill -9 run and the in-process run of a cell must log identical validation losses after the
failure (tolerance 0: same world size, same deterministic CPU kernels, the same recovery code), so their rework
and ||delta|| are identical; full rollback must log exactly the reference's losses after F.

    python bench/scar_kill9.py            # 9 runs of 65 steps; ~20 minutes on the shared 2-core CPU box
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scar_rework import MODELS, THRESHOLD, machine, measure_rework  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("full", "partial", "prioritized", "round_robin", "random")
C = 20                  # full checkpoint interval
R = 0.25                # partial checkpoints: this fraction every R * C = 5 steps
FAILURE = 30            # the last step completed before rank 1 dies (F); c = 20
VAL_EVERY = 5
CAP = 30                # rework measured up to this many steps after the first evaluation


class LoggedRun:
    """What `measure_rework` asks of a run (`setup`, `val_loss()`, `step(t)`), answered from a finished run's
    metrics.jsonl: stepping moves a cursor, `val_loss` reads the loss logged there."""

    def __init__(self, val: dict[int, float], smooth: int, start: int):
        self.setup = SimpleNamespace(smooth=smooth, cap=CAP, val_every=VAL_EVERY)
        self.val = val
        self.s = start

    def val_loss(self) -> float:
        return self.val[self.s]

    def step(self, t: int) -> None:
        self.s = t


def config(tmp: Path, data: Path, strategy: str | None) -> Path:
    m = MODELS["tiny"]
    steps = FAILURE + VAL_EVERY + CAP
    ft: dict[str, Any] = {"recovery": "full" if strategy == "full" else "partial", "interval": 0,
                          "block_elements": m["block_elements"], "local_dir": str(tmp / "shm")}
    if strategy in ("prioritized", "round_robin", "random"):
        ft.update(interval=C, fraction=R, strategy=strategy)
    cfg = {
        "model": {"vocab_size": m["vocab"], "hidden_size": m["hidden"], "num_layers": m["layers"],
                  "num_heads": m["heads"], "num_kv_heads": m["kv_heads"], "intermediate_size": m["mlp"],
                  "max_seq_len": m["seq_len"]},
        "data": {"path": str(data), "seq_len": m["seq_len"], "seed": 1001},
        "optimizer": {"lr": m["lr"], "min_lr": m["lr"] / 10},
        "schedule": {"steps": steps, "warmup_steps": m["warmup"]},
        "batch": {"global_batch_size": m["batch"], "micro_batch_size": m["batch"] // 2},
        "logging": {"val_every": VAL_EVERY, "val_samples": m["val_samples"], "progress": False,
                    "wandb": {"mode": "disabled"}},
        "parallel": {"device": "cpu", "data_parallel": "fsdp"},
        "checkpoint": {"every": C, "resume": "auto"},
        "fault_tolerance": ft if strategy is not None else {"recovery": "none"},
    }
    path = tmp / f"{strategy or 'reference'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, run: Path, inject: str | None) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "glassbox.train", "--config", str(cfg), "--run-dir", str(run)]
    if inject:
        cmd += ["--inject-failure", inject]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    (run / "torchrun.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("glassbox:", "[scar]"))]
        raise SystemExit(f"{run.name}: torchrun failed ({proc.returncode}):\n" + "\n".join(said[-20:]))
    return time.perf_counter() - started


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def events(run: Path) -> list[dict]:
    return json.loads((run / "manifest.json").read_text()).get("recovery_events", [])


def rework_of(strategy: str, run: Path, reference: dict[int, float]) -> dict[str, Any]:
    val = val_losses(run)
    if strategy == "full":
        return {"rework": FAILURE - C * (FAILURE // C), "censored": False}
    start = FAILURE + VAL_EVERY
    rework, censored = measure_rework(LoggedRun(val, MODELS["tiny"]["smooth"], start), start, reference)
    return {"rework": VAL_EVERY + rework, "censored": censored}


def summarize_event(run: Path) -> dict[str, Any] | None:
    found = events(run)
    if not found:
        return None
    e = found[-1]
    keep = ("kind", "step", "lost_ranks", "lost_blocks", "sources", "source_steps", "delta_norm", "delta_rel",
            "progress_norm", "predicted_rework", "checkpoint", "redone_steps")
    return {k: e.get(k) for k in keep}


def cell(strategy: str, kill9: Path, inproc: Path | None, reference: dict[int, float]) -> dict[str, Any]:
    after = lambda v: {s: x for s, x in v.items() if s > FAILURE}     # noqa: E731
    k_val = after(val_losses(kill9))
    out: dict[str, Any] = {"strategy": strategy, "kill9": {**rework_of(strategy, kill9, reference),
                                                           "event": summarize_event(kill9)}}
    if strategy == "full":
        diff = max(abs(k_val[s] - reference[s]) for s in k_val)
        out.update(in_process={"rework": out["kill9"]["rework"], "note": "F - c by definition"},
                   val_loss_max_abs_diff=diff, agrees=diff == 0.0, compared_with="reference (no failure)")
        return out
    i_val = after(val_losses(inproc))
    diff = max(abs(k_val[s] - i_val[s]) for s in k_val)
    ke, ie = summarize_event(kill9), summarize_event(inproc)
    same_event = all(ke[k] == ie[k] for k in ("sources", "source_steps", "delta_norm", "lost_blocks"))
    out.update(in_process={**rework_of(strategy, inproc, reference), "event": ie},
               val_loss_max_abs_diff=diff, agrees=diff == 0.0 and same_event, same_event=same_event,
               compared_with="in-process failure")
    return out


def markdown(result: dict) -> str:
    lines = ["# SCAR with a real kill -9 (torchrun, 2 gloo ranks, CPU, tiny model)", "",
             f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs "
             f"({result['machine']['host']}). C = {C}, r = {R}, failure after step {FAILURE} (rank 1 of 2: lost "
             f"fraction 1/2), validation every {VAL_EVERY} steps, threshold {THRESHOLD:.1%}.", "",
             "| strategy | rework, kill -9 | rework, in process | ||delta|| kill -9 | ||delta|| in process | "
             "blocks by source (kill -9) | val-loss max abs diff | agrees |", "|---|---:|---:|---:|---:|---|---:|:---:|"]
    for c in result["cells"]:
        ke = c["kill9"]["event"] or {}
        ie = (c["in_process"].get("event") or {})
        fmt = lambda x: "-" if x is None else f"{x:.4g}"       # noqa: E731
        lines.append(f"| {c['strategy']} | {c['kill9']['rework']}{' (censored)' if c['kill9']['censored'] else ''}"
                     f" | {c['in_process']['rework']} | {fmt(ke.get('delta_norm'))} | {fmt(ie.get('delta_norm'))} | "
                     f"{ke.get('sources') or ke.get('redone_steps', '-')} | {c['val_loss_max_abs_diff']:.3g} | "
                     f"{'yes' if c['agrees'] else 'NO'} |")
    s = result["summary"]
    lines += ["", f"kill9_agrees: **{s['kill9_agrees']}** ({s['agreement']})", ""]
    return "\n".join(lines)


def main() -> int:
    from glassbox.data.prepare import prepare

    m = MODELS["tiny"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scar-kill9-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        prepare(["stdlib"], data, vocab_size=m["vocab"], max_bytes=m["data_bytes"], progress=False)
        seconds = {"reference": train(config(tmp, data, None), tmp / "reference", None)}
        reference = val_losses(tmp / "reference")
        cells = []
        for strategy in STRATEGIES:
            cfg = config(tmp, data, strategy)
            kill9 = tmp / f"{strategy}-kill9"
            seconds[kill9.name] = train(cfg, kill9, f"rank=1,step={FAILURE + 1}")
            inproc = None
            if strategy != "full":
                inproc = tmp / f"{strategy}-inprocess"
                seconds[inproc.name] = train(cfg, inproc, f"rank=1,step={FAILURE + 1},in_process")
            cells.append(cell(strategy, kill9, inproc, reference))
            print(json.dumps(cells[-1], default=str), flush=True)
            for run in (kill9, inproc):
                if run is not None:
                    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    result = {
        "summary": {
            "kill9_agrees": all(c["agrees"] for c in cells),
            "agreement": "per strategy, the kill -9 run logs exactly the in-process run's validation losses after "
                         "the failure (full rollback: exactly the unfailed reference's) and records the same "
                         "recovery (sources, source steps, ||delta||); tolerance 0, because both run at the same "
                         "world size on deterministic CPU kernels through the same recovery code",
            "cells": len(cells), "lost_fraction": 0.5, "C": C, "r": R, "failure_step": FAILURE,
        },
        "cells": cells,
        "setup": {"model": "tiny", **m, "world_size": 2, "val_every": VAL_EVERY, "cap": CAP, "threshold": THRESHOLD},
        "seconds": seconds, "total_seconds": time.perf_counter() - started,
        "machine": machine(), "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scar_kill9.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "scar_kill9.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["summary"]["kill9_agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
