"""The corruption matrix: each kind of file of a run directory and a data store, damaged (flipped, truncated,
deleted, a field edited), against each command that reads it. Every case either refuses, naming the file, or
is unaffected (a resume that falls back to an older checkpoint, saying which it refused and why)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from glassbox.cli import main

CKPT = "run/checkpoints/step_000004"
COMMANDS = {
    "verify": ["checkpoint", "verify", CKPT],
    "export": ["export", "--checkpoint", CKPT, "--out", "hf"],
    "resume-path": ["train", "--config", "run/config.yaml", "--run-dir", "run", "--steps", "6", "--resume", CKPT],
    "resume-auto": ["train", "--config", "run/config.yaml", "--run-dir", "run", "--steps", "6", "--resume", "auto"],
    "train": ["train", "--config", "run/config.yaml", "--run-dir", "fresh", "--steps", "2"],
    "data-batch": ["data", "batch", "--run", "run", "--step", "3"],
    "reproduce": ["reproduce", "--run", "run", "--step", "4"],
}


@pytest.fixture(scope="module")
def base(prepared_data, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4) beside its own store, all paths relative to one folder."""
    root = tmp_path_factory.mktemp("matrix-base")
    shutil.copytree(prepared_data, root / "store", ignore=shutil.ignore_patterns("cache"))
    cfg = {
        "model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64, "max_seq_len": 32},
        "data": {"path": "store", "seq_len": 32, "seed": 7},
        "schedule": {"steps": 4, "warmup_steps": 1},
        "batch": {"global_batch_size": 4, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 4, "progress": False, "wandb": {"mode": "disabled"}},
        "parallel": {"device": "cpu"},
        "checkpoint": {"every": 2},
        "run_dir": "run",
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    cwd = Path.cwd()
    try:
        import os

        os.chdir(root)
        assert main(["train", "--config", "run.yaml"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:                                           # edit a field of a JSON file, leaving it valid JSON
        obj = json.loads(path.read_text())
        key = {"MANIFEST.json": "step", "meta.json": "eod_id"}[path.name]
        obj[key] += 1
        path.write_text(json.dumps(obj))


# (file, damage, command, what is expected: "refuse" naming the file, or "fallback" to step 2 saying why)
CASES = [
    (f"{CKPT}/dcp/__0_0.distcp", how, cmd, "fallback" if cmd == "resume-auto" else "refuse")
    for how in ("flip", "truncate", "delete") for cmd in ("verify", "export", "resume-path", "resume-auto")
] + [
    (f"{CKPT}/{name}", how, cmd, "fallback" if cmd == "resume-auto" else "refuse")
    for name, how in (("MANIFEST.json", "edit"), ("dcp/.metadata", "flip"), ("train_state.pt", "truncate"),
                      ("rng/rank_00000.pt", "delete"), ("tokenizer/tokenizer.json", "flip"))
    for cmd in ("verify", "export", "resume-path", "resume-auto")
] + [
    (f"store/{name}", how, cmd, "refuse")
    for name, how in (("train.bin", "flip"), ("train.idx", "flip"), ("meta.json", "edit"),
                      ("tokenizer.json", "truncate"))
    for cmd in ("train", "resume-auto", "data-batch", "reproduce")
] + [
    ("run/data_order.zarr/rows/c/0/0", how, cmd, "refuse")
    for how in ("truncate", "delete") for cmd in ("resume-auto", "data-batch", "reproduce")
]


@pytest.mark.parametrize("rel,how,command,expected", CASES,
                         ids=[f"{Path(r).name}-{h}-{c}" for r, h, c, _ in CASES])
def test_damaged_file_against_command(base, tmp_path, monkeypatch, capsys, rel, how, command, expected):
    case = tmp_path / "case"
    shutil.copytree(base, case)
    _damage(case / rel, how)
    monkeypatch.chdir(case)
    code = main(COMMANDS[command])
    out, err = capsys.readouterr()
    named = Path(rel).name if Path(rel).name not in ("0",) else "data_order.zarr"
    if expected == "refuse":
        assert code == 2, out + err
        assert named in err or Path(rel).parent.name in err, err
    else:
        assert code == 0, out + err
        assert "refusing step_000004" in out and "falling back" in out and "step_000002" in out, out
