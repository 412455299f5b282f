"""Measured job traces for the simulator: per-model throughput by GPU placement and statistical efficiency by
training progress, read from the Pollux OSDI'21 artifact's CSV layout.

A model's trace directory holds `placements.csv` (placement, local_bsz, step_time, sync_time: one row per measured
placement such as "13" = one GPU on one node and three on another), `scalability.csv` (num_nodes, num_replicas,
local_bsz, step_time, sync_time: larger allocations, measured without the exact placement) and
`validation-<batch>.csv` (progress, iteration, metric, grad_sqr, grad_var: one row per epoch of a run at that
global batch size). The simulator takes the *true* step time and gradient statistics of a configuration from
here; the scheduler's policies never read them directly, they learn a goodput model from what the job observed,
as a real job would.

Every file is checked as it is read: a missing column, an unparsable or non-finite number, a non-positive time or
batch size, or an empty file is one TraceError naming the file, the row (as the line number in the file) and the
column.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glassbox.errors import GlassboxError

PLACEMENT_COLUMNS = ("placement", "local_bsz", "step_time", "sync_time")
SCALABILITY_COLUMNS = ("num_nodes", "num_replicas", "local_bsz", "step_time", "sync_time")
VALIDATION_COLUMNS = ("progress", "iteration", "grad_sqr", "grad_var")
VALIDATION_FILE = re.compile(r"^validation-(\d+)\.csv$")

# The artifact's per-model settings: epochs to train (the completion point) and, for yolov3, the largest local batch
# that fits in a GPU's memory (its traces measure beyond that). Every other bound comes from the traces themselves.
ARTIFACT_MODELS: dict[str, dict[str, int]] = {
    "bert": {"max_epochs": 2},
    "cifar10": {"max_epochs": 100},
    "ncf": {"max_epochs": 10},
    "imagenet": {"max_epochs": 90},
    "deepspeech2": {"max_epochs": 80},
    "yolov3": {"max_epochs": 50, "max_local_bsz": 8},
}


class TraceError(GlassboxError):
    """A trace file that cannot be used: the message names the file, and the row and column where it applies."""


def read_table(path: Path, columns: tuple[str, ...], positive: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The named numeric columns of a CSV file as float arrays (extra columns are ignored).

    Rows are numbered as lines of the file (the header is line 1), which is what an editor shows."""
    if not path.is_file():
        raise TraceError(f"{path}: trace file not found")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty file (expected a header with columns {', '.join(columns)})")
        header = [name.strip() for name in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}: missing column(s) {', '.join(missing)} (header has: {', '.join(header)})")
        index = {c: header.index(c) for c in columns}
        values: dict[str, list[float]] = {c: [] for c in columns}
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            for c in columns:
                cell = row[index[c]].strip() if index[c] < len(row) else ""
                try:
                    value = float(cell)
                except ValueError:
                    raise TraceError(f"{path}: row {line}, column {c}: {cell!r} is not a number") from None
                if not math.isfinite(value):
                    raise TraceError(f"{path}: row {line}, column {c}: {cell!r} is not finite")
                if c in positive and value <= 0:
                    raise TraceError(f"{path}: row {line}, column {c}: {cell!r} must be positive")
                values[c].append(value)
    if not values[columns[0]]:
        raise TraceError(f"{path}: no data rows")
    return {c: np.asarray(v, dtype=np.float64) for c, v in values.items()}


@dataclass(frozen=True)
class EfficiencyCurve:
    """One validation run at a fixed global batch size: cumulative progress and gradient statistics per epoch."""

    batch_size: int
    progress: np.ndarray
    iteration: np.ndarray
    grad_sqr: np.ndarray
    grad_var: np.ndarray


def _placement_digits(path: Path, line: int, value: float) -> tuple[int, ...]:
    text = str(int(value))
    if value != int(value) or "0" in text:
        raise TraceError(f"{path}: row {line}, column placement: {value!r} is not a placement (one digit 1-9 of "
                         "GPUs per node, e.g. 13)")
    return tuple(int(d) for d in text)


def canonical_placement(placement: tuple[int, ...]) -> tuple[int, ...]:
    """A placement with empty nodes dropped, rotated to its lexicographically smallest form: the traces measure
    each ring of nodes once, and a ring's rotations run at the same speed."""
    p = tuple(n for n in placement if n)
    return min(p[i:] + p[:i] for i in range(len(p))) if p else p


@dataclass
class ModelTrace:
    """Everything the simulator knows about one model: true step times by placement and local batch, and true
    gradient statistics by batch size and epoch."""

    name: str
    directory: Path
    curves: dict[int, EfficiencyCurve]
    placements: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]]
    scatter_points: np.ndarray
    scatter_values: np.ndarray
    init_batch_size: int
    max_batch_size: int
    min_local_bsz: int
    max_local_bsz: int
    max_epochs: int
    _interpolator: object = field(default=None, repr=False)
    _step_cache: dict = field(default_factory=dict, repr=False)

    def step_time(self, placement: tuple[int, ...], local_bsz: float) -> tuple[float, float]:
        """(step_time, sync_time) in seconds of one optimizer step at this placement and per-GPU batch."""
        key = (canonical_placement(placement), float(local_bsz))
        if key not in self._step_cache:
            self._step_cache[key] = self._measured_step_time(*key)
        return self._step_cache[key]

    def _measured_step_time(self, placement: tuple[int, ...], local_bsz: float) -> tuple[float, float]:
        if not placement:
            raise TraceError(f"{self.name}: a step time was asked of an empty placement")
        if placement in self.placements:
            bsz, step, sync = self.placements[placement]
            return float(np.interp(local_bsz, bsz, step)), float(np.interp(local_bsz, bsz, sync))
        # Unmeasured placement: interpolate linearly in (nodes, replicas, local batch) over every measurement, as
        # the artifact does; beyond 16 nodes the traces have nothing, so the 16-node figures stand in.
        if self._interpolator is None:
            from scipy.interpolate import LinearNDInterpolator

            self._interpolator = LinearNDInterpolator(self.scatter_points, self.scatter_values)
        point = [min(len(placement), 16), sum(placement), local_bsz]
        step, sync = self._interpolator([point])[0]
        if not (math.isfinite(step) and math.isfinite(sync)):
            raise TraceError(f"{self.directory}: no measurement brackets placement {''.join(map(str, placement))} "
                             f"at local batch {local_bsz:g} (nodes, replicas, batch outside the traces' hull)")
        return float(step), float(sync)

    def _bracket(self, batch_size: float) -> tuple[int, int, float]:
        sizes = list(self.curves)
        if not sizes[0] <= batch_size <= sizes[-1]:
            raise TraceError(f"{self.name}: batch size {batch_size:g} is outside the validated range "
                             f"{sizes[0]}-{sizes[-1]} ({self.directory})")
        lo = max(b for b in sizes if b <= batch_size)
        hi = min(b for b in sizes if b >= batch_size)
        weight = 0.0 if hi == lo else (batch_size - lo) / (hi - lo)
        return lo, hi, weight

    def grad_stats(self, batch_size: float, epoch: int) -> tuple[float, float]:
        """(grad_sqr, grad_var) during `epoch` at this global batch, linear between the two measured batches."""
        lo, hi, w = self._bracket(batch_size)
        a, b = self.curves[lo], self.curves[hi]
        return ((1 - w) * a.grad_sqr[epoch] + w * b.grad_sqr[epoch],
                (1 - w) * a.grad_var[epoch] + w * b.grad_var[epoch])

    def iterations(self, batch_size: float, epoch: int) -> float:
        """Optimizer steps taken by the end of `epoch` at this global batch (linear between measured batches)."""
        lo, hi, w = self._bracket(batch_size)
        return (1 - w) * self.curves[lo].iteration[epoch] + w * self.curves[hi].iteration[epoch]

    @functools.cached_property
    def epoch_progress(self) -> np.ndarray:
        """Progress (in steps at the initial batch size) at the start of each epoch, 0 .. max_epochs: the smallest
        measured across batch sizes, so an epoch is counted done as soon as any run would have finished it."""
        ends = np.min(np.stack([c.progress[: self.max_epochs] for c in self.curves.values()]), axis=0)
        return np.concatenate([[0.0], ends])


def load_model_trace(directory: str | Path, max_epochs: int | None = None,
                     max_local_bsz: int | None = None) -> ModelTrace:
    """Read and check one model's trace directory (see the module docstring for the files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"{directory}: trace directory not found")
    curves: dict[int, EfficiencyCurve] = {}
    for path in sorted(directory.glob("validation-*.csv")):
        match = VALIDATION_FILE.match(path.name)
        if not match or int(match.group(1)) <= 0:
            raise TraceError(f"{path}: a validation file is named validation-<positive batch size>.csv")
        t = read_table(path, VALIDATION_COLUMNS, positive=("progress",))
        bad = np.flatnonzero((t["grad_sqr"] < 0) | (t["grad_var"] < 0))
        if bad.size:
            col = "grad_sqr" if t["grad_sqr"][bad[0]] < 0 else "grad_var"
            raise TraceError(f"{path}: row {bad[0] + 2}, column {col}: gradient statistics cannot be negative")
        if np.any(np.diff(t["progress"]) <= 0):
            row = int(np.flatnonzero(np.diff(t["progress"]) <= 0)[0]) + 3
            raise TraceError(f"{path}: row {row}, column progress: progress must increase from epoch to epoch")
        size = int(match.group(1))
        curves[size] = EfficiencyCurve(size, t["progress"], t["iteration"], t["grad_sqr"], t["grad_var"])
    if not curves:
        raise TraceError(f"{directory}: no validation-<batch>.csv files (statistical efficiency traces)")
    curves = dict(sorted(curves.items()))

    placements_path = directory / "placements.csv"
    p = read_table(placements_path, PLACEMENT_COLUMNS, positive=("placement", "local_bsz", "step_time"))
    by_placement: dict[tuple[int, ...], list[tuple[float, float, float]]] = {}
    nodes, replicas = [], []
    for i, value in enumerate(p["placement"]):
        digits = _placement_digits(placements_path, i + 2, value)
        if p["sync_time"][i] < 0 or p["sync_time"][i] > p["step_time"][i]:
            raise TraceError(f"{placements_path}: row {i + 2}, column sync_time: {p['sync_time'][i]:g} must be "
                             f"between 0 and the step time {p['step_time'][i]:g}")
        by_placement.setdefault(digits, []).append((p["local_bsz"][i], p["step_time"][i], p["sync_time"][i]))
        nodes.append(len(digits))
        replicas.append(sum(digits))
    placements = {}
    for key, rows in by_placement.items():
        rows.sort()
        arr = np.asarray(rows)
        placements[key] = (arr[:, 0], arr[:, 1], arr[:, 2])

    s = read_table(directory / "scalability.csv", SCALABILITY_COLUMNS,
                   positive=("num_nodes", "num_replicas", "local_bsz", "step_time"))
    bad = np.flatnonzero(s["num_nodes"] > s["num_replicas"])
    if bad.size:
        raise TraceError(f"{directory / 'scalability.csv'}: row {bad[0] + 2}, column num_nodes: more nodes than "
                         "replicas")
    # The scattered measurements: each placement's rows averaged per (nodes, replicas, batch), plus scalability.
    keyed: dict[tuple[float, float, float], list[tuple[float, float]]] = {}
    for i in range(len(p["placement"])):
        keyed.setdefault((nodes[i], replicas[i], p["local_bsz"][i]), []).append((p["step_time"][i],
                                                                                p["sync_time"][i]))
    points = [list(k) for k in keyed] + np.column_stack(
        [s["num_nodes"], s["num_replicas"], s["local_bsz"]]).tolist()
    values = [np.mean(v, axis=0).tolist() for v in keyed.values()] + np.column_stack(
        [s["step_time"], s["sync_time"]]).tolist()

    epochs_measured = min(len(c.progress) for c in curves.values())
    max_epochs = max_epochs or epochs_measured
    if max_epochs > epochs_measured:
        raise TraceError(f"{directory}: {max_epochs} epochs asked, but the shortest validation file has "
                         f"{epochs_measured} rows")
    min_local = int(p["local_bsz"].min())
    max_local = int(max_local_bsz or p["local_bsz"].max())
    if max(curves) < min_local:
        raise TraceError(f"{directory}: the largest validated batch {max(curves)} is below the smallest local "
                         f"batch measured {min_local}")
    return ModelTrace(
        name=directory.name, directory=directory, curves=curves, placements=placements,
        scatter_points=np.asarray(points, dtype=np.float64), scatter_values=np.asarray(values, dtype=np.float64),
        init_batch_size=min(curves), max_batch_size=max(curves), min_local_bsz=min_local,
        max_local_bsz=max_local, max_epochs=max_epochs)


def load_artifact_traces(traces_dir: str | Path) -> dict[str, ModelTrace]:
    """The six models of the Pollux artifact, with the artifact's epoch counts and memory limits."""
    traces_dir = Path(traces_dir)
    return {name: load_model_trace(traces_dir / name, **settings) for name, settings in ARTIFACT_MODELS.items()}
