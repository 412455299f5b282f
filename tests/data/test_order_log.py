"""The data-order log and `glassbox data batch`: rebuild a step's batch, and catch a modified store."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
import zarr
from tokenizers import Tokenizer

from glassbox.cli import main
from glassbox.data.config import DataConfig
from glassbox.data import order_log
from glassbox.data.order_log import DataOrderLog, batch_hash
from glassbox.data.sampler import build_sampler
from glassbox.errors import GlassboxError


def test_batch_hash_follows_every_token_and_the_shape():
    x = torch.arange(24).reshape(4, 6)
    assert batch_hash(x) == batch_hash(x.clone()) == batch_hash(x.to(torch.int32))
    y = x.clone()
    y[3, 5] += 1
    assert batch_hash(y) != batch_hash(x)
    assert batch_hash(x.reshape(6, 4)) != batch_hash(x)
    assert len(batch_hash(x)) == 64


def test_log_appends_reads_back_truncates_and_persists(tmp_path):
    log = DataOrderLog(tmp_path)
    hashes = [batch_hash(torch.tensor([i])) for i in range(1, 8)]
    for step in range(1, 8):
        log.append(step, cursor_start=10 * step, batch_size=step, token_hash=hashes[step - 1])
    assert len(log) == 7
    assert log.row(3) == {"step": 3, "cursor_start": 30, "batch_size": 3, "token_hash": hashes[2]}
    with pytest.raises(GlassboxError, match="cannot log step 5"):
        log.append(5, 0, 1, hashes[0])
    with pytest.raises(GlassboxError, match="hex digits"):
        log.append(8, 0, 1, "abc")
    log.truncate(4)
    log.append(5, 999, 2, hashes[6])
    reopened = DataOrderLog(tmp_path, read_only=True)
    assert len(reopened) == 5 and reopened.row(5)["cursor_start"] == 999 and reopened.row(4)["token_hash"] == hashes[3]
    with pytest.raises(GlassboxError, match="step 6 is not logged"):
        reopened.row(6)
    with pytest.raises(GlassboxError, match="no data-order log"):
        DataOrderLog(tmp_path / "elsewhere", read_only=True)


def _hashes(n):
    return [batch_hash(torch.tensor([i])) for i in range(n)]


def test_journal_rows_are_read_back_folded_and_a_torn_last_record_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(order_log, "FOLD_STEPS", 4)
    hashes = _hashes(11)
    log = DataOrderLog(tmp_path)
    for step in range(1, 11):
        log.append(step, 3 * step, 3, hashes[step], micro_batch_size=1, lr_scale=0.5, progress=step)
    journal = log.path / order_log.JOURNAL
    # Steps 1..8 were folded (two folds of four), 9 and 10 are in the journal: a reader sees all ten.
    assert zarr.open_group(str(log.path), mode="r").attrs["steps"] == 8
    assert journal.stat().st_size == 2 * order_log._RECORD_BYTES
    reader = DataOrderLog(tmp_path, read_only=True)
    assert len(reader) == 10 and reader.check(10)["cursor_start"] == 30
    assert reader.plan_row(9) == {"step": 9, "cursor_start": 27, "batch_size": 3, "token_hash": hashes[9],
                                  "micro_batch_size": 1, "lr_scale": 0.5, "progress": 9.0}
    assert reader.row(4) == {"step": 4, "cursor_start": 12, "batch_size": 3, "token_hash": hashes[4]}

    # A crash mid-write leaves part of a record: readers stop before it, the next writer cuts it off and goes on.
    with open(journal, "ab") as f:
        f.write(order_log._encode((11, 33, 3, bytes(32), 1.0, 1.0, 11.0))[:50])
    assert len(DataOrderLog(tmp_path, read_only=True)) == 10
    log = DataOrderLog(tmp_path)
    log.append(11, 33, 3, hashes[10])
    assert len(DataOrderLog(tmp_path, read_only=True)) == 11
    # A flipped byte fails the record's CRC: that step and every later one are not logged.
    data = bytearray(journal.read_bytes())
    data[order_log._RECORD_BYTES + 5] ^= 1
    journal.write_bytes(bytes(data))
    assert len(DataOrderLog(tmp_path, read_only=True)) == 9
    with pytest.raises(GlassboxError, match="opened read-only"):
        reader.fold()


def test_a_fold_interrupted_before_the_journal_is_emptied_loses_and_doubles_nothing(tmp_path):
    hashes = _hashes(7)
    log = DataOrderLog(tmp_path)
    for step in range(1, 6):
        log.append(step, step, 1, hashes[step])
    journal = log.path / order_log.JOURNAL
    stale = journal.read_bytes()
    log.fold()
    assert not journal.exists()             # a folded log is plain zarr
    # As if the process died after the arrays took the rows but before the journal was removed:
    journal.write_bytes(stale)
    reader = DataOrderLog(tmp_path, read_only=True)
    assert len(reader) == 5 and reader.row(5)["cursor_start"] == 5
    log = DataOrderLog(tmp_path)            # the writer drops the records the arrays hold
    assert not journal.exists() and len(log) == 5
    log.append(6, 6, 1, hashes[6])
    assert len(DataOrderLog(tmp_path, read_only=True)) == 6


def test_truncate_within_the_journal_and_below_the_arrays(tmp_path, monkeypatch):
    monkeypatch.setattr(order_log, "FOLD_STEPS", 4)
    hashes = _hashes(20)
    log = DataOrderLog(tmp_path)
    for step in range(1, 8):                # 1..4 folded, 5..7 in the journal
        log.append(step, step, 1, hashes[step])
    log.truncate(6)
    assert len(log) == 6 and len(DataOrderLog(tmp_path, read_only=True)) == 6
    log.append(7, 70, 1, hashes[7])
    assert DataOrderLog(tmp_path, read_only=True).row(7)["cursor_start"] == 70
    log.truncate(2)
    assert len(log) == 2 and not (log.path / order_log.JOURNAL).exists()
    log.append(3, 300, 1, hashes[3])
    reader = DataOrderLog(tmp_path, read_only=True)
    assert len(reader) == 3 and reader.row(3)["cursor_start"] == 300 and reader.row(2)["cursor_start"] == 2


def _train_run(run_dir, data_dir, batch_sizes):
    """What the trainer does per step: take the global batch, log cursor, size and hash."""
    cfg = DataConfig(path=str(data_dir), seq_len=32, seed=11)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": dataclasses.asdict(cfg)}))
    sampler, log = build_sampler(cfg), DataOrderLog(run_dir)
    batches = []
    for step, b in enumerate(batch_sizes, 1):
        batch = sampler.next_batch(b)
        log.append(step, batch.start, batch.size, batch_hash(batch.tokens))
        batches.append(batch)
    return batches


def test_data_batch_rebuilds_a_step_and_catches_a_modified_store(store_copy, tmp_path, capsys):
    run = tmp_path / "run"
    batches = _train_run(run, store_copy, [4, 2, 6])
    assert main(["data", "batch", "--run", str(run), "--step", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "global samples [6, 12)" in out[0] and "matches the log" in out[0]
    rows = [list(map(int, line.split())) for line in out[1:] if not line.startswith("---")]
    assert torch.equal(torch.tensor(rows), batches[2].tokens)

    assert main(["data", "batch", "--run", str(run), "--step", "1", "--decode"]) == 0
    text = capsys.readouterr().out
    tok = Tokenizer.from_file(str(store_copy / "tokenizer.json"))
    assert tok.decode(batches[0].tokens[0].tolist(), skip_special_tokens=False) in text

    assert main(["data", "batch", "--run", str(run), "--step", "9"]) == 2
    assert "step 9 is not logged" in capsys.readouterr().err

    # Flip tokens in place, as a silently modified store would: same size, same meta.json, other ids.
    with open(store_copy / "train.bin", "r+b") as f:
        data = bytearray(f.read())
        data[::2] = bytes((b + 1) % 256 for b in data[::2])
        f.seek(0)
        f.write(data)
    assert main(["data", "batch", "--run", str(run), "--step", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "step 2" in err and "the data changed since training" in err
    assert "\n" not in err
