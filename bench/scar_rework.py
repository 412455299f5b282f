"""SCAR's claim, measured: how much rework a partial failure costs under each recovery strategy.

A failure loses the state of some of W = 8 FSDP2 ranks (their dim-0 shards of every parameter and both Adam
moments) after step F. Rework = the extra steps until the recovered run's smoothed validation loss is within 0.5%
of an unperturbed run's at the same token count (the same step: no strategy rewinds the data, and a full rollback's
redone steps are counted as its rework). Strategies:

- full: every rank back to the last full checkpoint (every C steps). Its replay from that exact checkpoint is the
  unperturbed run itself (checked bit for bit in every unit), so its rework is exactly the F - c redone steps.
- partial: only the lost blocks from the last full checkpoint; survivors keep their values; no rewind.
- prioritized / round_robin / random: no full checkpoints; instead each rank writes the fraction r of its blocks
  every r*C steps (rounded to whole steps, r adjusted so the I/O is exactly a full checkpoint's every C steps),
  chosen by the baselines or by priority: ||Delta_b||^2 / size_b, Delta_b the block's distance from what recovery
  would put back (its newest saved copy, else the initial state: the selector is given that fallback, so a
  never-saved block ranks by how far it moved from it). A lost block comes from its newest saved copy (the zarr
  block store), else the initial state.

The run of a unit is max(steps, 8 C) steps (the failure uniform in [0.1, 0.9] of it), so every interval has had
about four checkpoint cycles by a typical failure: a run too short for C (400 steps at C = 200 had one or two)
mostly measures failures before the partial strategies have saved every block once, i.e. the initial state.
The C <= 50 units keep the base length, so their runs are the ones an earlier grid measured.

Each recovery goes through the code path a real one uses: BlockLayout of the W-rank layout, BlockSelector per
rank, the BlockStore on disk (the lost ranks' saved blocks, at their saved steps), recover_blocks with its sources
into FullStateAccess. The unperturbed reference run is shared by all cells of a (seed, C) unit and its snapshots
are reused; units run in parallel processes (--workers). In a unit the failure step F and the lost ranks are drawn
once (the ranks nested: those lost at 1/8 are among those lost at 1/4, ...), so every r and strategy faces the
same failure; selection is simulated only on the ranks that can be lost (the others' choices change nothing).

Per cell (lost fraction, C, r) it reports each strategy's mean rework over seeds, the % reduction against full
rollback, ||delta||, the I/O per C steps, and a least-squares fit of rework against SCAR's log(1 + ||delta|| /
||theta_F - theta_{F-C}||). Writes bench/results/<out-name>.json/.md/.png.

    python bench/scar_rework.py --quick                          # a small grid, ~5 minutes on 2 loaded CPU cores
    python bench/scar_rework.py --workers 2                      # the full grid on CPU (tiny model)
    python bench/scar_rework.py --workers 16 --out-name scar_rework_cpu16
    python bench/scar_rework.py --device cuda --model 125m --lost 0.125,0.25 --intervals 25,50 --r 0.25 \
        --seeds 3 --workers 3 --out-name scar_rework_h200         # the reduced GPU grid (runs of 300 / 400 steps)
    python bench/scar_rework.py --resummarize                    # re-aggregate (e.g. once scar_kill9.json exists)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import ChainMap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 8
THRESHOLD = 0.005
STRATEGIES = ("full", "partial", "prioritized", "round_robin", "random")
SELECTED = ("prioritized", "round_robin", "random")
CHECKPOINTS_PER_RUN = 8


@dataclass(frozen=True)
class Setup:
    """Everything that defines one benchmark grid (recorded in the JSON)."""

    model: str
    device: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    data_bytes: int
    seq_len: int
    batch: int
    steps: int                 # the run: failures happen in [0.1, 0.9] of it
    cap: int                   # rework is measured up to this many steps after the failure (else censored)
    val_every: int
    val_samples: int
    smooth: int                # validation evaluations averaged (trailing) for the smoothed loss
    lr: float
    warmup: int
    block_elements: int
    lost_fractions: tuple[float, ...]
    intervals: tuple[int, ...]
    fractions: tuple[float, ...]
    seeds: int
    checkpoints_per_run: int = CHECKPOINTS_PER_RUN   # a unit's run is max(steps, this * C) steps


MODELS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=176, vocab=512, data_bytes=400_000, seq_len=64,
                 batch=8, steps=400, cap=200, val_every=5, val_samples=16, smooth=3, lr=3e-3, warmup=20,
                 block_elements=1024),
    # The 125M / 350M bodies of bench/train_mfu.py with the bundled corpus' 4096-token vocabulary.
    "125m": dict(hidden=768, layers=12, heads=12, kv_heads=4, mlp=2048, vocab=4096, data_bytes=3_000_000,
                 seq_len=256, batch=16, steps=300, cap=150, val_every=5, val_samples=32, smooth=3, lr=1e-3,
                 warmup=20, block_elements=1 << 18),
    "350m": dict(hidden=1024, layers=24, heads=16, kv_heads=8, mlp=2816, vocab=4096, data_bytes=3_000_000,
                 seq_len=256, batch=16, steps=300, cap=150, val_every=5, val_samples=32, smooth=3, lr=6e-4,
                 warmup=20, block_elements=1 << 18),
}
FULL_GRID = dict(lost_fractions=(1 / 8, 1 / 4, 1 / 2), intervals=(25, 50, 100, 200), fractions=(0.1, 0.25, 0.5),
                 seeds=5)
QUICK_GRID = dict(lost_fractions=(1 / 8, 1 / 4), intervals=(25, 50), fractions=(0.25,), seeds=2)


def run_steps(setup: Setup, interval: int) -> int:
    """A unit's run length: long enough for `checkpoints_per_run` intervals, never shorter than the base run."""
    return max(setup.steps, setup.checkpoints_per_run * interval)


def make_setup(args: argparse.Namespace) -> Setup:
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key, value in (("lost_fractions", args.lost), ("intervals", args.intervals), ("fractions", args.r)):
        if value:
            grid[key] = tuple(float(v) if key != "intervals" else int(v) for v in value.split(","))
    if args.seeds:
        grid["seeds"] = args.seeds
    base = dict(MODELS[args.model])
    if args.quick:
        base.update(steps=200, cap=100)
    if args.steps:
        base.update(steps=args.steps, cap=args.steps // 2)
    return Setup(model=args.model, device=args.device, **base, **grid)


# ---------------------------------------------------------------------------------------------------------------
# The training run: a glassbox Llama model, AdamW, warmup + cosine, batches from a prepared token store.

def prepare_data(setup: Setup) -> Path:
    from glassbox.data.prepare import prepare

    root = Path(os.environ.get("SCAR_BENCH_DATA", Path(tempfile.gettempdir()) / "glassbox-scar-bench"))
    out = root / f"stdlib-v{setup.vocab}-{setup.data_bytes}"
    prepare(["stdlib"], out, vocab_size=setup.vocab, max_bytes=setup.data_bytes, progress=False)
    return out


class Run:
    """One seed's model, optimizer and data; `step(s)` takes training step s (1-based) of the reference order; the
    LR schedule spans `steps` (the unit's run) plus the rework cap."""

    def __init__(self, setup: Setup, data_dir: Path, seed: int, steps: int):
        from glassbox.data.config import DataConfig
        from glassbox.data.sampler import build_sampler
        from glassbox.fault_tolerance.blocks import BlockLayout, FullStateAccess
        from glassbox.models.transformer import ModelConfig, Transformer
        from glassbox.train.lr_schedule import WarmupDecay

        self.setup = setup
        self.device = torch.device(setup.device)
        cfg = ModelConfig(vocab_size=setup.vocab, hidden_size=setup.hidden, num_layers=setup.layers,
                          num_heads=setup.heads, num_kv_heads=setup.kv_heads, intermediate_size=setup.mlp,
                          max_seq_len=setup.seq_len, tie_embeddings=True)
        torch.manual_seed(seed)
        self.model = Transformer(cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=setup.lr, betas=(0.9, 0.95),
                                           weight_decay=0.1)
        self.schedule = WarmupDecay(steps + setup.cap, setup.warmup, "cosine", 0.1)
        self.layout = BlockLayout.of_model(self.model, WORLD, block_elements=setup.block_elements)
        self.access = FullStateAccess(self.model, self.optimizer, self.layout)
        data = DataConfig(path=str(data_dir), seq_len=setup.seq_len, seed=1000 + seed)
        self.train_samples = build_sampler(data)
        self.val_ids = build_sampler(data, split="valid").samples(0, setup.val_samples).to(self.device)
        self.params = dict(self.model.named_parameters())
        self.autocast = self.device.type == "cuda"

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    def step(self, s: int) -> None:
        ids = self.train_samples.samples((s - 1) * self.setup.batch, self.setup.batch).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.setup.lr * self.schedule(s - 1)
        self._loss(ids).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def val_loss(self) -> float:
        return float(self._loss(self.val_ids))

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every parameter and moment (a full checkpoint of this state, kept in memory)."""
        out = {}
        for name, p in self.params.items():
            state = self.optimizer.state.get(p, {})
            out[name] = {"param": p.detach().clone(),
                         **{k: state[k].clone() if k in state else torch.zeros_like(p) for k in ("exp_avg",
                                                                                                 "exp_avg_sq")}}
            out[name]["step"] = state["step"].clone() if "step" in state else None
        return out

    def restore(self, snap: dict[str, dict[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(snap[name]["param"])
                if snap[name]["step"] is None:
                    self.optimizer.state.pop(p, None)
                    continue
                state = self.optimizer.state[p]
                state["step"] = snap[name]["step"].clone()
                for k in ("exp_avg", "exp_avg_sq"):
                    state[k] = snap[name][k].clone()

    def blocks_of(self, snap: dict, blocks: list) -> dict:
        return {b: {k: snap[b.name][k][b.start:b.stop].float().cpu() for k in ("param", "exp_avg", "exp_avg_sq")}
                for b in blocks}


def state_distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(torch.sum((a[n][k].double() - b[n][k].double()) ** 2))
                         for n in a for k in ("param", "exp_avg", "exp_avg_sq")))


def same_state(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n][k], b[n][k]) for n in a for k in ("param", "exp_avg", "exp_avg_sq"))


# ---------------------------------------------------------------------------------------------------------------
# One unit: a seed and an interval C; its reference run serves every lost fraction, r and strategy.

def _smoothed(values: list[float], w: int) -> float:
    return sum(values[-w:]) / len(values[-w:])


def measure_rework(run: Run, start: int, reference: dict[int, float]) -> tuple[int, bool]:
    """From the (recovered) state at step `start`: train on until the smoothed validation loss, over evaluations
    since `start`, is within THRESHOLD of the reference's smoothed over the same steps; (rework, censored)."""
    s, mine, theirs = start, [], []
    setup = run.setup
    while True:
        mine.append(run.val_loss())
        theirs.append(reference[s])
        if _smoothed(mine, setup.smooth) <= (1 + THRESHOLD) * _smoothed(theirs, setup.smooth):
            return s - start, False
        if s - start >= setup.cap:
            return s - start, True
        for t in range(s + 1, s + setup.val_every + 1):
            run.step(t)
        s += setup.val_every


def run_unit(job: tuple[Setup, str, int, int, int]) -> dict[str, Any]:
    setup, data_dir, seed, interval, threads = job
    from glassbox.fault_tolerance.block_store import BlockStore
    from glassbox.fault_tolerance.blocks import FullStateAccess
    from glassbox.fault_tolerance.recovery import SnapshotSource, recover_blocks
    from glassbox.fault_tolerance.selection import BlockSelector

    torch.set_num_threads(threads)
    started = time.perf_counter()
    rng = random.Random(f"scar-{seed}-{interval}")
    ve = setup.val_every
    steps = run_steps(setup, interval)
    failure = ve * rng.randint(math.ceil(0.1 * steps / ve), math.floor(0.9 * steps / ve))
    # Nested: the ranks lost at 1/8 are among those lost at 1/4, and so on (cleaner comparisons across fractions).
    order = rng.sample(range(WORLD), WORLD)
    lost_ranks = {f: sorted(order[:max(1, round(f * WORLD))]) for f in setup.lost_fractions}
    # Only ranks that can be lost need their selection simulated: the others' choices change nothing here, and
    # every rank's I/O is the same fraction of its own state by construction.
    simulated = sorted({k for ranks in lost_ranks.values() for k in ranks})
    last_full = (failure // interval) * interval
    run = Run(setup, Path(data_dir), seed, steps)
    layout = run.layout
    rank_access = {k: FullStateAccess(run.model, run.optimizer, layout, ranks=[k]) for k in simulated}
    simulated_elements = sum(layout.num_elements(b) for k in simulated for b in layout.blocks_of_rank(k))
    # What recovery falls back to for a block no partial checkpoint holds (the initial state), per rank: with the
    # saved copies on top it is each block's restore source, which prioritized selection measures change against.
    initial = {k: {b: rank_access[k].read(b) for b in rank_access[k].blocks} for k in simulated}

    # Selection along the reference trajectory, per rank, as each rank's checkpoint callback would do it.
    plans = {}
    for r in setup.fractions:
        every = max(1, round(r * interval))
        for strategy in SELECTED:
            plans[(r, strategy)] = {
                "every": every, "fraction": every / interval, "written": 0,
                "selectors": {k: BlockSelector(strategy, every / interval, seed=seed * 100 + k) for k in simulated},
                "saved": {k: {} for k in simulated}, "steps": {}, "calls": 0,
            }
    snaps = {0: run.snapshot()}
    need = {last_full, max(0, failure - interval), failure}
    reference = {0: run.val_loss()}
    step_time = 0.0
    for s in range(1, failure + setup.cap + 1):
        t0 = time.perf_counter()
        run.step(s)
        step_time += time.perf_counter() - t0
        if s % ve == 0:
            reference[s] = run.val_loss()
        if s in need:
            snaps[s] = run.snapshot()
        if s > failure:
            continue
        for plan in plans.values():
            if s % plan["every"]:
                continue
            for k, selector in plan["selectors"].items():
                chosen = selector.select(rank_access[k], ChainMap(plan["saved"][k], initial[k]))
                for b in chosen:
                    plan["saved"][k][b] = rank_access[k].read(b)
                    plan["steps"][b] = s
                plan["written"] += sum(layout.num_elements(b) for b in chosen)
            plan["calls"] += 1
    step_ms = 1000 * step_time / (failure + setup.cap)
    snap_f, snap_c, snap_0 = snaps[failure], snaps[last_full], snaps[0]
    progress = state_distance(snap_f, snaps[max(0, failure - interval)])

    # Full rollback: the replay from the exact checkpoint must be the reference itself.
    run.restore(snap_c)
    for s in range(last_full + 1, failure + 1):
        run.step(s)
    replay_exact = same_state(run.snapshot(), snap_f)
    full_delta = state_distance(snap_c, snap_f)

    records = []
    quiet = dict(log=lambda m: None)
    with tempfile.TemporaryDirectory(prefix="scar-bench-") as tmp:
        for f, ranks in lost_ranks.items():
            lost = [b for k in ranks for b in layout.blocks_of_rank(k)]
            base = dict(seed=seed, C=interval, run_steps=steps, lost_fraction=f, lost_ranks=ranks, failure_step=failure,
                        last_full=last_full, progress_norm=progress)
            records.append({**base, "strategy": "full", "r": None, "r_effective": None,
                            "rework": failure - last_full, "censored": False, "delta_norm": full_delta,
                            "delta_rel": None, "predicted": math.log1p(full_delta / progress),
                            "io_bytes_per_C": 12 * simulated_elements, "replay_exact": replay_exact})
            cases = [("partial", None, [SnapshotSource(f"full checkpoint step {last_full}", last_full,
                                                       run.blocks_of(snap_c, lost))])]
            for (r, strategy), plan in plans.items():
                store = BlockStore(Path(tmp) / f"f{f:.3f}-r{r}-{strategy}", layout, name="block_store")
                by_step: dict[int, dict] = {}
                for k in ranks:
                    for b, tensors in plan["saved"][k].items():
                        by_step.setdefault(plan["steps"][b], {})[b] = tensors
                for step, blocks in sorted(by_step.items()):
                    store.write(step, blocks)
                cases.append((strategy, r, [store, SnapshotSource("initial state step 0", 0,
                                                                  run.blocks_of(snap_0, lost))]))
            for strategy, r, sources in cases:
                run.restore(snap_f)
                before = {b: run.access.read(b) for b in lost}
                event = recover_blocks(run.access, lost, sources, step=failure, lost_ranks=ranks, before=before,
                                       progress_norm=progress, **quiet)
                rework, censored = measure_rework(run, failure, reference)
                plan = plans.get((r, strategy))
                stale = [failure - x.source_step for x in event.restored]
                records.append({**base, "strategy": strategy, "r": r,
                                "r_effective": plan["fraction"] if plan else None, "rework": rework,
                                "censored": censored, "delta_norm": event.delta_norm, "delta_rel": event.delta_rel,
                                "predicted": event.predicted_rework,
                                "io_bytes_per_C": _io_per_interval(plan, interval) if plan else 12 * simulated_elements,
                                "blocks_from_store": sum(x.source == "block_store" for x in event.restored),
                                "blocks_lost": len(lost), "mean_staleness": statistics.fmean(stale)})
    return {"seed": seed, "C": interval, "records": records, "step_ms": step_ms, "replay_exact": replay_exact,
            "seconds": time.perf_counter() - started}


def _io_per_interval(plan: dict, interval: int) -> float | None:
    """Bytes (param + both moments, fp32) a strategy wrote per C steps, averaged over its calls before the
    failure (None when the failure came before its first write)."""
    return 12 * plan["written"] / plan["calls"] * interval / plan["every"] if plan["calls"] else None


# ---------------------------------------------------------------------------------------------------------------
# Aggregation, fit, outputs.

def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize_cells(records: list[dict], setup: Setup) -> list[dict]:
    cells = []
    for f in setup.lost_fractions:
        for c in setup.intervals:
            for r in setup.fractions:
                row: dict[str, Any] = {"lost_fraction": f, "C": c, "r": r}
                for strategy in STRATEGIES:
                    mine = [x for x in records if x["lost_fraction"] == f and x["C"] == c
                            and x["strategy"] == strategy and (x["r"] in (None, r))]
                    row[strategy] = {
                        "rework_mean": _mean([x["rework"] for x in mine]),
                        "rework": [x["rework"] for x in mine],
                        "censored": sum(x["censored"] for x in mine),
                        "delta_norm_mean": _mean([x["delta_norm"] for x in mine]),
                        "io_bytes_per_C": _mean([x["io_bytes_per_C"] for x in mine if x["io_bytes_per_C"]]),
                        "r_effective": mine[0]["r_effective"] if mine else None,
                        "seeds": len(mine),
                    }
                full = row["full"]["rework_mean"]
                for strategy in STRATEGIES[1:]:
                    mean = row[strategy]["rework_mean"]
                    row[strategy]["reduction_vs_full"] = (1 - mean / full) if full else None
                cells.append(row)
    return cells


def _ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return 1.0 if a == 0 else None


def fit(records: list[dict]) -> dict[str, Any]:
    """Least squares rework = a + b * log(1 + ||delta|| / ||theta_F - theta_{F-C}||), with Pearson and Spearman
    correlations, over all recoveries and over the partial ones alone."""
    out = {}
    for label, chosen in (("all", records), ("partial_only", [x for x in records if x["strategy"] != "full"])):
        pts = [(x["predicted"], x["rework"]) for x in chosen if x["predicted"] is not None]
        if len(pts) < 3:
            out[label] = None
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        syy = sum((y - my) ** 2 for y in ys)
        slope = sxy / sxx if sxx else 0.0
        pearson = sxy / math.sqrt(sxx * syy) if sxx and syy else None
        out[label] = {"n": len(pts), "intercept": my - slope * mx, "slope": slope,
                      "r2": pearson ** 2 if pearson is not None else None, "pearson": pearson,
                      "spearman": _spearman(xs, ys)}
    return out


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxx = sum((x - mx) ** 2 for x in rx)
    syy = sum((y - my) ** 2 for y in ry)
    if not sxx or not syy:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(rx, ry)) / math.sqrt(sxx * syy)


def summary_of(cells: list[dict], records: list[dict], kill9: Path) -> dict[str, Any]:
    low = [c for c in cells if c["lost_fraction"] <= 0.25 + 1e-9]
    reductions = [c["prioritized"]["reduction_vs_full"] for c in low if c["prioritized"]["reduction_vs_full"]
                  is not None]
    ratios = {}
    for base in ("round_robin", "random"):
        vals = [_ratio(c["prioritized"]["rework_mean"], c[base]["rework_mean"]) for c in cells]
        ratios[base] = [v for v in vals if v is not None]
    kill9_agrees = None
    if kill9.is_file():
        kill9_agrees = json.loads(kill9.read_text()).get("summary", {}).get("kill9_agrees")
    missing = [{"lost_fraction": c["lost_fraction"], "C": c["C"], "r": c["r"],
                "reduction": c["prioritized"]["reduction_vs_full"]}
               for c in low if (c["prioritized"]["reduction_vs_full"] or 0) < 0.78]
    worse = [{"lost_fraction": c["lost_fraction"], "C": c["C"], "r": c["r"], "baseline": base,
              "prioritized": c["prioritized"]["rework_mean"], "other": c[base]["rework_mean"]}
             for c in cells for base in ("round_robin", "random")
             if c["prioritized"]["rework_mean"] > c[base]["rework_mean"]]
    return {
        "reduction_vs_full": min(reductions) if reductions else None,
        "reduction_vs_full_mean": _mean(reductions),
        "prioritized_vs_round_robin": _mean(ratios["round_robin"]),
        "prioritized_vs_random": _mean(ratios["random"]),
        "kill9_agrees": kill9_agrees,
        "goal_reduction": 0.78,
        "cells_below_goal": missing,
        "cells_prioritized_worse": worse,
        "censored_recoveries": sum(x["censored"] for x in records),
        "full_rollback_replays_exact": all(x.get("replay_exact", True) for x in records),
    }


def machine() -> dict[str, Any]:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "processor": platform.processor()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    setup, s = result["setup"], result["summary"]
    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu_count']}-core CPU ({m['processor'] or m['platform']})"
    lines = [
        f"# SCAR rework ({setup['model']} model on {setup['device']}, {where}, {result['workers']} workers)",
        "",
        f"W = {WORLD} virtual FSDP2 ranks, run of max({setup['steps']}, {setup.get('checkpoints_per_run', 1)} C) steps "
        f"(failure uniform in [0.1, 0.9] of it, "
        f"on a {setup['val_every']}-step grid), {setup['seeds']} seeds per cell, batch {setup['batch']} x "
        f"{setup['seq_len']} tokens, rework = steps until the smoothed ({setup['smooth']} evaluations) validation "
        f"loss is within {THRESHOLD:.1%} of the unperturbed run (censored at {setup['cap']}); {result['params']:,} "
        f"parameters, {result['blocks']} blocks; {result['step_ms']:.1f} ms per step; {result['seconds']:.0f} s.",
        "",
        f"**Summary**: smallest reduction of partial + prioritized vs full rollback at lost fraction <= 1/4: "
        f"{_fmt(100 * s['reduction_vs_full'] if s['reduction_vs_full'] is not None else None)}% "
        f"(mean {_fmt(100 * s['reduction_vs_full_mean'] if s['reduction_vs_full_mean'] is not None else None)}%;"
        f" goal 78%); prioritized / round-robin rework "
        f"{_fmt(s['prioritized_vs_round_robin'], '.2f')}, prioritized / random {_fmt(s['prioritized_vs_random'], '.2f')}"
        f" (mean of per-cell ratios, < 1 is better); kill -9 agrees: {s['kill9_agrees']}; "
        f"{s['censored_recoveries']} censored recoveries; full-rollback replays bit-exact: "
        f"{s['full_rollback_replays_exact']}.",
        "",
        "Mean rework in steps (reduction vs full rollback in brackets); ||delta|| of the restored state; I/O per C "
        "steps (param + both moments, fp32) of the ranks whose selection is simulated (those that can be lost), "
        "partial strategies vs a full checkpoint of the same ranks.",
        "",
        "| lost | C | r (eff.) | full | partial | prioritized | round-robin | random | ||delta|| part / prio / rr / "
        "rand | I/O MB per C |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        def cell(name: str) -> str:
            x = c[name]
            red = x.get("reduction_vs_full")
            cens = f", {x['censored']} cens." if x["censored"] else ""
            return f"{_fmt(x['rework_mean'])}" + (f" ({_fmt(100 * red, '.0f')}%{cens})" if red is not None else cens)

        deltas = " / ".join(_fmt(c[n]["delta_norm_mean"], ".3g") for n in ("partial", "prioritized",
                                                                             "round_robin", "random"))
        lines.append(f"| 1/{round(1 / c['lost_fraction'])} | {c['C']} | {c['r']} "
                     f"({_fmt(c['prioritized']['r_effective'], '.3f')}) | {cell('full')} | {cell('partial')} | "
                     f"{cell('prioritized')} | {cell('round_robin')} | {cell('random')} | {deltas} | "
                     f"{_fmt((c['prioritized']['io_bytes_per_C'] or 0) / 1e6, '.2f')} vs "
                     f"{_fmt(c['full']['io_bytes_per_C'] / 1e6, '.2f')} |")
    lines += ["", "Notes: full rollback's rework is its redone steps F - c (its replay from the exact checkpoint is "
              "the reference run, checked bit for bit per unit); the partial strategies restore only the lost ranks' "
              "blocks and rewind nothing; a block no partial checkpoint holds comes from the initial state. "
              "Prioritized writes the blocks with the largest ||Delta||^2 / size, Delta measured from what recovery "
              "would put back (the saved copy, else the initial state)."]
    fits = result["fit"]
    lines += ["", "Fit of measured rework (steps) against log(1 + ||delta|| / ||theta_F - theta_{F-C}||):", ""]
    for label, f in fits.items():
        if f:
            lines.append(f"- {label}: rework = {f['intercept']:.1f} + {f['slope']:.1f} x bound, n = {f['n']}, "
                         f"R^2 = {_fmt(f['r2'], '.2f')}, Spearman = {_fmt(f['spearman'], '.2f')}")
    if s["cells_below_goal"]:
        lines += ["", "Cells below the 78% goal (lost <= 1/4): " + ", ".join(
            f"1/{round(1 / x['lost_fraction'])} C={x['C']} r={x['r']}: {_fmt(100 * (x['reduction'] or 0), '.0f')}%"
            for x in s["cells_below_goal"])]
    if s["cells_prioritized_worse"]:
        lines += ["", "Cells where prioritized reworks more than a baseline: " + ", ".join(
            f"1/{round(1 / x['lost_fraction'])} C={x['C']} r={x['r']} vs {x['baseline']} "
            f"({_fmt(x['prioritized'])} vs {_fmt(x['other'])})" for x in s["cells_prioritized_worse"])]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(13.0, 6 + 0.3 * len(cells)), 4.8))
    labels = [f"1/{round(1 / c['lost_fraction'])},C{c['C']},r{c['r']}" for c in cells]
    width = 0.16
    for i, strategy in enumerate(STRATEGIES):
        ax1.bar([j + (i - 2) * width for j in range(len(cells))], [c[strategy]["rework_mean"] or 0 for c in cells],
                width, label=strategy)
    ax1.set_xticks(range(len(cells)))
    ax1.set_xticklabels(labels, rotation=90, fontsize=6)
    ax1.set_ylabel("mean rework (steps)")
    ax1.set_title("rework per cell (lost fraction, C, r)")
    ax1.legend(fontsize=7)
    for strategy in STRATEGIES:
        pts = [(x["predicted"], x["rework"]) for x in result["records"] if x["strategy"] == strategy
               and x["predicted"] is not None]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label=strategy, alpha=0.6)
    f = result["fit"].get("all")
    if f:
        xs = [x["predicted"] for x in result["records"] if x["predicted"] is not None]
        lo, hi = min(xs), max(xs)
        ax2.plot([lo, hi], [f["intercept"] + f["slope"] * lo, f["intercept"] + f["slope"] * hi], "k--",
                 label=f"fit, R^2={_fmt(f['r2'], '.2f')}")
    ax2.set_xlabel("log(1 + ||delta|| / ||theta_F - theta_{F-C}||)")
    ax2.set_ylabel("rework (steps)")
    ax2.set_title("measured rework vs the SCAR bound")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="tiny", choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="a small grid: lost 1/8, 1/4; C 25, 50; r 0.25; 2 seeds")
    p.add_argument("--workers", type=int, default=2, help="units (seed, C) run in parallel processes")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--lost", default=None, help="lost fractions, comma-separated (default: the grid's)")
    p.add_argument("--intervals", default=None, help="intervals C, comma-separated")
    p.add_argument("--r", default=None, help="partial-checkpoint fractions r, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="run length (cap = half of it)")
    p.add_argument("--out-name", default="scar_rework")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the summary, table and plot from the records in <out-name>.json (no training), "
                        "e.g. once bench/results/scar_kill9.json exists")
    args = p.parse_args()
    if args.resummarize:
        result = json.loads((RESULTS / f"{args.out_name}.json").read_text())
        grid = {k: tuple(result["setup"][k]) for k in ("lost_fractions", "intervals", "fractions")}
        setup = Setup(**{**result["setup"], **grid})
        finish(result, setup, result["records"], args.out_name)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    setup = make_setup(args)
    started = time.perf_counter()
    data_dir = prepare_data(setup)
    # CPU units train on one thread each; on a GPU the host's cores are shared out for the selection's reads.
    threads = 1 if setup.device == "cpu" else max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [(setup, str(data_dir), seed, c, threads) for seed in range(setup.seeds) for c in setup.intervals]
    print(f"[scar] {len(jobs)} units (seeds x C) on {args.workers} workers, {setup.model} on {setup.device}",
          flush=True)
    units = []
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        for unit in pool.imap_unordered(run_unit, jobs):
            units.append(unit)
            print(f"[scar] seed {unit['seed']} C={unit['C']}: {unit['seconds']:.0f} s, "
                  f"{unit['step_ms']:.1f} ms/step, replay exact {unit['replay_exact']}", flush=True)
    records = [x for u in sorted(units, key=lambda u: (u["seed"], u["C"])) for x in u["records"]]
    torch.set_num_threads(1)
    probe = Run(setup, data_dir, 0, setup.steps)
    result = {
        "setup": asdict(setup), "machine": machine(), "workers": args.workers,
        "params": sum(p.numel() for p in probe.model.parameters()), "blocks": len(probe.layout.blocks),
        "step_ms": statistics.median(u["step_ms"] for u in units), "seconds": time.perf_counter() - started,
    }
    finish(result, setup, records, args.out_name)
    return 0


def finish(result: dict, setup: Setup, records: list[dict], out_name: str) -> None:
    """Aggregate `records` into cells, summary and fit; write <out_name>.json, .md and .png."""
    cells = summarize_cells(records, setup)
    result.update(summary=summary_of(cells, records, RESULTS / "scar_kill9.json"), fit=fit(records), cells=cells,
                  records=records)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{out_name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{out_name}.png")
    print(markdown(result))


if __name__ == "__main__":
    sys.exit(main())
