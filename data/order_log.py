"""The data-order log: RUN_DIR/data_order.zarr records, per step, which samples the step consumed.

Row N (steps are 1-based) holds the cursor before step N, its global batch size, and a hash of the batch's token
ids. With the store and the sampler settings this is enough to rebuild any step's batch exactly and to prove it
is the batch that was trained on (`glassbox data batch`). Beside it, the step's plan as it ran (micro-batch size,
learning-rate scale, training progress), so `glassbox reproduce` replays a run whose plan changed step by step. zarr appends by chunk and writes each chunk through a
temporary file and a rename, so a crash never leaves a torn row behind.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from glassbox.errors import GlassboxError

HASH_BYTES = 32
_COLUMNS = 2 + HASH_BYTES // 8
PLAN_COLUMNS = ["micro_batch_size", "lr_scale", "progress"]
_CHUNK_ROWS = 4096


def batch_hash(tokens: torch.Tensor) -> str:
    """sha256 of a global batch's token ids (as little-endian int64, shape included), as hex."""
    ids = np.ascontiguousarray(tokens.detach().cpu().numpy().astype("<i8", copy=False))
    h = hashlib.sha256(repr(tuple(ids.shape)).encode())
    h.update(ids.tobytes())
    return h.hexdigest()


def check_logged_batch(tokens: torch.Tensor, row: dict, source: str) -> str:
    """Hash a global batch rebuilt from the data and compare it with its data-order log row; returns the hash.

    The one check behind `glassbox data batch`, release build and reproduce: a store that changed since training
    fails here, naming the step, where the batch was rebuilt from, and both hashes.
    """
    digest = batch_hash(tokens)
    if digest != row["token_hash"]:
        raise GlassboxError(
            f"step {row['step']}: the batch rebuilt from {source} hashes to {digest[:16]}, but the run logged "
            f"{row['token_hash'][:16]}: the data changed since training"
        )
    return digest


class DataOrderLog:
    """Append-only per-step log in `run_dir/data_order.zarr`; see the module docstring.

    One int64 array `rows` of [capacity, 6]: cursor_start, batch_size, then the 32-byte hash as four int64 words,
    and one float64 array `plan` of [capacity, 3] (PLAN_COLUMNS; floats hold every micro-batch size exactly); the
    group attribute `steps` says how many rows are valid. An append is two chunk writes plus one small attribute
    write (the arrays grow a chunk at a time).
    """

    def __init__(self, run_dir: str | Path, read_only: bool = False):
        import zarr

        self.path = Path(run_dir) / "data_order.zarr"
        if read_only and not self.path.exists():
            raise GlassboxError(f"{self.path}: no data-order log (was this run trained by glassbox?)")
        try:
            group = zarr.open_group(str(self.path), mode="r" if read_only else "a")
            if not read_only and "rows" not in group:
                group.create_array("rows", shape=(0, _COLUMNS), chunks=(_CHUNK_ROWS, _COLUMNS), dtype="int64")
                group.attrs["columns"] = ["cursor_start", "batch_size", "token_hash[0:8]", "token_hash[8:16]",
                                          "token_hash[16:24]", "token_hash[24:32]"]
                group.create_array("plan", shape=(0, len(PLAN_COLUMNS)), chunks=(_CHUNK_ROWS, len(PLAN_COLUMNS)),
                                   dtype="float64")
                group.attrs["plan_columns"] = PLAN_COLUMNS
            self._group = group
            self._rows = group["rows"]
            self._plan = group["plan"]
            self._steps = int(group.attrs.get("steps", 0))
        except (KeyError, ValueError, OSError) as e:
            raise GlassboxError(f"{self.path}: not a readable data-order log ({type(e).__name__}: {e})") from None
        if (self._rows.ndim != 2 or self._rows.shape[1] != _COLUMNS or not 0 <= self._steps <= self._rows.shape[0]
                or self._plan.shape[0] < self._steps):
            raise GlassboxError(f"{self.path}: rows {self._rows.shape} / steps {self._steps} is not a data-order log")

    def __len__(self) -> int:
        return self._steps

    def _set_steps(self, n: int) -> None:
        self._group.attrs["steps"] = n
        self._steps = n

    def append(self, step: int, cursor_start: int, batch_size: int, token_hash: str, *,
               micro_batch_size: int | None = None, lr_scale: float | None = None,
               progress: float | None = None) -> None:
        """Record step `step`; it must be the next step (call `truncate` first when resuming). The plan columns
        are the trainer's; a step logged without them (data-order tools) cannot be replayed by `reproduce`."""
        if step != len(self) + 1:
            raise GlassboxError(
                f"{self.path}: cannot log step {step}, the log holds steps 1..{len(self)} "
                f"(on resume, truncate the log to the checkpoint's step first)"
            )
        try:
            digest = bytes.fromhex(token_hash)
        except ValueError:
            digest = b""
        if len(digest) != HASH_BYTES:
            raise GlassboxError(f"token_hash {token_hash!r}: expected {2 * HASH_BYTES} hex digits (batch_hash)")
        row = np.concatenate([np.array([cursor_start, batch_size], dtype=np.int64), np.frombuffer(digest, "<i8")])
        if self._rows.shape[0] < step:
            self._rows.resize((self._rows.shape[0] + _CHUNK_ROWS, _COLUMNS))
        if self._plan.shape[0] < step:
            self._plan.resize((self._plan.shape[0] + _CHUNK_ROWS, len(PLAN_COLUMNS)))
        # The row is written before the step count claims it, so a crash in between leaves the log as it was.
        plan = [math.nan if v is None else v for v in (micro_batch_size, lr_scale, progress)]
        try:
            self._rows[step - 1] = row
            self._plan[step - 1] = np.array(plan, dtype=np.float64)
        except Exception as e:      # writing a row rereads its chunk: a damaged one fails here, in the codec
            raise GlassboxError(f"{self.path}: the chunk holding {self._chunk_steps(step)} cannot be written "
                                f"({type(e).__name__}: {e}); the data-order log is damaged") from None
        self._set_steps(step)

    def _chunk_steps(self, step: int) -> str:
        first = (step - 1) // _CHUNK_ROWS * _CHUNK_ROWS + 1
        return f"steps {first}..{first + _CHUNK_ROWS - 1}"

    def _read(self, array, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one of the log's arrays; a chunk that cannot be read (truncated, corrupted) is an error
        naming the log and the steps it holds, not the codec's own."""
        try:
            return np.asarray(array[lo:hi])
        except Exception as e:      # zarr and its codecs raise many types for a damaged chunk
            raise GlassboxError(f"{self.path}: the chunk holding {self._chunk_steps(lo + 1)} cannot be read "
                                f"({type(e).__name__}: {e}); the data-order log is damaged") from None

    def _check_rows(self, rows: np.ndarray, first_step: int) -> None:
        """A row whose batch size is 0 was never written: its chunk was deleted (zarr reads it as zeros)."""
        empty = np.flatnonzero(rows[:, 1] <= 0)
        if empty.size:
            step = first_step + int(empty[0])
            raise GlassboxError(f"{self.path}: step {step} reads as an empty row: the chunk holding "
                                f"{self._chunk_steps(step)} is missing; the data-order log is damaged")

    def check(self, through_step: int) -> dict:
        """Read every row up to `through_step` (all must be there and intact) and return the last one."""
        if through_step > len(self):
            raise GlassboxError(f"{self.path}: holds steps 1..{len(self)}, but the run is at step {through_step}")
        self._check_rows(self._read(self._rows, 0, through_step), 1)
        return self.row(through_step)

    def row(self, step: int) -> dict:
        if not 1 <= step <= len(self):
            raise GlassboxError(f"{self.path}: step {step} is not logged (the log holds steps 1..{len(self)})")
        r = self._read(self._rows, step - 1, step).astype("<i8")
        self._check_rows(r, step)
        r = r[0]
        return {
            "step": step,
            "cursor_start": int(r[0]),
            "batch_size": int(r[1]),
            "token_hash": r[2:].tobytes().hex(),
        }

    def plan_row(self, step: int) -> dict:
        """`row(step)` with the step's plan as the trainer ran it (PLAN_COLUMNS); an error for a step logged
        without one."""
        row = self.row(step)
        plan = self._read(self._plan, step - 1, step)[0].astype(np.float64)
        if np.isnan(plan).any():
            raise GlassboxError(f"{self.path}: step {step} was logged without its plan (micro-batch, LR scale, "
                                "progress), so it cannot be replayed")
        row.update(micro_batch_size=int(plan[0]), lr_scale=float(plan[1]), progress=float(plan[2]))
        return row

    def truncate(self, last_step: int) -> None:
        """Drop rows after `last_step` (a run resumed from that step's checkpoint re-logs what follows)."""
        if last_step < 0:
            raise GlassboxError(f"truncate({last_step}): step must be >= 0")
        self._set_steps(min(last_step, len(self)))
