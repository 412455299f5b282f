"""The data-order log: RUN_DIR/data_order.zarr records, per step, which samples the step consumed.

Row N (steps are 1-based) holds the cursor before step N, its global batch size, and a hash of the batch's token
ids. With the store and the sampler settings this is enough to rebuild any step's batch exactly and to prove it
is the batch that was trained on (`glassbox data batch`). Beside it, the step's plan as it ran (micro-batch size,
learning-rate scale, training progress), so `glassbox reproduce` replays a run whose plan changed step by step.

A step's row is written through at once, since a run killed at any step must resume or recover (SCAR) from a log
that holds every step it trained, but not into the zarr arrays: rewriting a 4096-row chunk and the group's
attributes cost ~5 ms a step on a CPU and ~10 ms on the H200's host, a sixth of a small model's step. Each row is
appended to `journal.bin` inside the group (one `write` of a fixed-size record carrying its step and a CRC), and
the journal is folded into the arrays every `FOLD_STEPS` steps and when training ends. Readers see the arrays'
rows followed by the journal's consecutive intact records; a torn last record (a crash mid-write) is dropped.
zarr writes each chunk through a temporary file and a rename, the step count is raised only after the rows it
claims are written, and the journal is emptied only after that, so a crash at any point loses no logged step.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from glassbox import atomic
from glassbox.errors import GlassboxError

HASH_BYTES = 32
_COLUMNS = 2 + HASH_BYTES // 8
PLAN_COLUMNS = ["micro_batch_size", "lr_scale", "progress"]
_CHUNK_ROWS = 4096
FOLD_STEPS = 1024
JOURNAL = "journal.bin"
# step, cursor_start, batch_size, token hash, micro_batch_size, lr_scale, progress; then a CRC32 of those bytes.
_RECORD = struct.Struct(f"<qqq{HASH_BYTES}sddd")
_RECORD_BYTES = _RECORD.size + 4


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
    group attribute `steps` says how many rows are valid; the rows after it are in the journal until folded.
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
        self._read_only = read_only
        self._journal_path = self.path / JOURNAL
        self._journal: list[tuple] = self._read_journal()
        if not read_only:
            # Cut a torn or stale tail, so the next record lands right after the last one readers take.
            self._cut_journal(len(self._journal))

    def __len__(self) -> int:
        return self._steps + len(self._journal)

    def _read_journal(self) -> list[tuple]:
        """The journal's records for steps `_steps + 1, + 2, ...`, in order, up to the first that is torn, fails
        its CRC, or does not follow. Records before them for steps the arrays hold (a fold a crash interrupted)
        are skipped; `_journal_skipped` counts them."""
        self._journal_skipped = 0
        try:
            data = self._journal_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise GlassboxError(f"{self._journal_path}: cannot be read ({e}); the data-order log is damaged") from None
        records: list[tuple] = []
        for at in range(0, len(data) - _RECORD_BYTES + 1, _RECORD_BYTES):
            body = data[at:at + _RECORD.size]
            if zlib.crc32(body) != struct.unpack_from("<I", data, at + _RECORD.size)[0]:
                break
            record = _RECORD.unpack(body)
            if not records and record[0] <= self._steps:
                self._journal_skipped += 1
                continue
            if record[0] != self._steps + len(records) + 1:
                break
            records.append(record)
        return records

    def _cut_journal(self, keep: int) -> None:
        """Leave exactly the first `keep` records readers take in the journal file, so appends follow them: a torn
        or stale tail is cut off, a file that starts with skipped records is rewritten without them, and an empty
        journal is removed."""
        if not self._journal_path.exists():
            return
        if keep == 0:
            # No file rather than an empty one: zarr warns of any file in the group it does not know.
            self._journal_path.unlink()
            self._journal_skipped = 0
        elif self._journal_skipped:
            atomic.write_bytes(self._journal_path, b"".join(_encode(r) for r in self._journal[:keep]))
            self._journal_skipped = 0
        elif self._journal_path.stat().st_size != keep * _RECORD_BYTES:
            os.truncate(self._journal_path, keep * _RECORD_BYTES)

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
        plan = [math.nan if v is None else float(v) for v in (micro_batch_size, lr_scale, progress)]
        record = (step, int(cursor_start), int(batch_size), digest, *plan)
        with open(self._journal_path, "ab") as f:
            f.write(_encode(record))
        self._journal.append(record)
        if len(self._journal) >= FOLD_STEPS:
            self.fold()

    def fold(self) -> None:
        """Move the journal's rows into the zarr arrays and empty it (every FOLD_STEPS steps, and when training
        ends, so a finished run's log is plain zarr). The rows are written before the step count claims them, and
        the journal is emptied after, so a crash in between leaves rows that are in both, which readers skip."""
        if self._read_only:
            raise GlassboxError(f"{self.path}: opened read-only, cannot fold its journal")
        if not self._journal:
            self._cut_journal(0)
            return
        first, last = self._steps + 1, self._steps + len(self._journal)
        rows = np.array([[r[1], r[2], *np.frombuffer(r[3], "<i8")] for r in self._journal], dtype=np.int64)
        plan = np.array([r[4:] for r in self._journal], dtype=np.float64)
        grow = -(-last // _CHUNK_ROWS) * _CHUNK_ROWS
        if self._rows.shape[0] < last:
            self._rows.resize((grow, _COLUMNS))
        if self._plan.shape[0] < last:
            self._plan.resize((grow, len(PLAN_COLUMNS)))
        try:
            self._rows[first - 1:last] = rows
            self._plan[first - 1:last] = plan
        except Exception as e:      # writing rows rereads their chunks: a damaged one fails here, in the codec
            raise GlassboxError(f"{self.path}: the chunk holding {self._chunk_steps(first)} cannot be written "
                                f"({type(e).__name__}: {e}); the data-order log is damaged") from None
        self._group.attrs["steps"] = last
        self._steps, self._journal = last, []
        self._cut_journal(0)

    def _journal_record(self, step: int) -> tuple:
        """The journal's record of a step after those the arrays hold."""
        return self._journal[step - self._steps - 1]

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
        self._check_rows(self._read(self._rows, 0, min(through_step, self._steps)), 1)
        return self.row(through_step)

    def row(self, step: int) -> dict:
        if not 1 <= step <= len(self):
            raise GlassboxError(f"{self.path}: step {step} is not logged (the log holds steps 1..{len(self)})")
        if step > self._steps:
            record = self._journal_record(step)
            return {"step": step, "cursor_start": record[1], "batch_size": record[2], "token_hash": record[3].hex()}
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
        if step > self._steps:
            plan = np.array(self._journal_record(step)[4:], dtype=np.float64)
        else:
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
        if last_step >= self._steps:
            keep = min(last_step - self._steps, len(self._journal))
            self._cut_journal(keep)
            self._journal = self._journal[:keep]
            return
        self._journal = []
        self._cut_journal(0)
        self._group.attrs["steps"] = last_step
        self._steps = last_step


def _encode(record: tuple) -> bytes:
    body = _RECORD.pack(*record)
    return body + struct.pack("<I", zlib.crc32(body))
