"""`glassbox release build` on a real tiny run: layout, cards, dataset, determinism, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from glassbox.cli import main
from glassbox.release.layout import ReleaseLayout, branch_name
from glassbox.release.manifest import check_manifest, list_files

from release_helpers import CHECKPOINT_STEPS, copy_tree, run_on_other_data


def test_release_layout_branches_and_manifest(built_release):
    layout = ReleaseLayout(built_release)
    index = json.loads(layout.index.read_text())
    names = [b["branch"] for b in index["branches"]]
    assert names == [branch_name(s) for s in CHECKPOINT_STEPS] == sorted(names)
    assert index["main_branch"] == branch_name(CHECKPOINT_STEPS[-1])
    for name in names:
        branch = layout.branch(name)
        assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in branch.iterdir()}
        assert (branch / "training_state" / "MANIFEST.json").is_file()
    # main is the final checkpoint's export, byte for byte
    final = layout.branch(index["main_branch"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (layout.model / name).read_bytes() == (final / name).read_bytes()
    manifest = json.loads(layout.manifest.read_text())
    assert set(manifest["files"]) == set(list_files(layout.root, exclude=("manifest.json",)))
    assert check_manifest(layout.root, manifest, "manifest.json").ok
    # validation loss falls as training goes on (4 steps at lr 3e-3 from a random init)
    losses = [b["val_loss"] for b in index["branches"]]
    assert losses[-1] < losses[0]


def test_model_card_has_hub_metadata_and_sections(built_release):
    card = (built_release / "model" / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == ["glassbox-test/tiny-data"]
    assert "llama" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    index = json.loads((built_release / "release.json").read_text())
    assert metrics["loss"] == pytest.approx(index["branches"][-1]["val_loss"], abs=1e-6)
    assert metrics["perplexity"] == pytest.approx(np.exp(index["branches"][-1]["val_loss"]), rel=1e-5)
    for section in ("## Architecture", "## Training hyperparameters", "## Data", "## Tokens and compute",
                    "## Loss curve", "## Checkpoints", "## How to load", "## How to reproduce"):
        assert section in card
    for b in index["branches"]:
        assert f"| `{b['branch']}` | {b['step']} | {b['tokens']} |" in card
    assert 'revision="step00000001"' in card
    assert index["data_fingerprint"] in card
    png = (built_release / "model" / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"matplotlib" not in png
    assert (built_release / "model" / "metrics" / "metrics.jsonl").read_text().count("\n") == 4
    assert (built_release / "model" / "reproduce" / "config.yaml").is_file()


def test_dataset_repo_holds_data_order_and_chunks_in_training_order(built_release, tiny_run):
    from glassbox.data.order_log import DataOrderLog, batch_hash

    ds = built_release / "dataset"
    for name in ("README.md", "meta.json", "tokenizer.json", "validation.npy", "store/meta.json",
                 "store/tokenizer.json", "data_order.zarr"):
        assert (ds / name).exists(), name
    assert list((ds / "store" / "cache").rglob("*.npy")), "the sample-order index files are released"
    assert not list(ds.rglob("*.lock"))
    log = DataOrderLog(ds, read_only=True)     # the released log reads back with the data pipeline's own reader
    prev = 0
    for step in CHECKPOINT_STEPS:
        chunk = torch.from_numpy(np.load(ds / "chunks" / f"{branch_name(step)}.npy").astype(np.int64))
        offset = 0
        for s in range(prev + 1, step + 1):
            row = log.row(s)
            batch = chunk[offset:offset + int(row["batch_size"])]
            assert batch_hash(batch) == row["token_hash"]
            offset += int(row["batch_size"])
        assert offset == chunk.shape[0]
        prev = step


def test_building_twice_gives_identical_bytes(built_release, tiny_run, tmp_path):
    again = tmp_path / "again"
    assert main(["release", "build", "--run", str(tiny_run), "--out", str(again), "--repo-id", "glassbox-test/tiny",
                 "--val-samples", "4"]) == 0
    assert (again / "manifest.json").read_bytes() == (built_release / "manifest.json").read_bytes()
    assert list_files(again) == list_files(built_release)
    (again / "model" / "README.md").write_text("stale")
    assert main(["release", "build", "--run", str(tiny_run), "--out", str(again), "--repo-id", "glassbox-test/tiny",
                 "--val-samples", "4", "--force"]) == 0
    assert (again / "model" / "README.md").read_bytes() == (built_release / "model" / "README.md").read_bytes()
    assert not list(again.parent.glob("again.*"))


def test_existing_output_is_refused_without_force(built_release, tiny_run, capsys):
    assert main(["release", "build", "--run", str(tiny_run), "--out", str(built_release)]) == 2
    assert "already exists" in capsys.readouterr().err


def _assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(out.name + "*"))


def test_missing_checkpoints_are_refused(tiny_run, tmp_path, capsys):
    run = copy_tree(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    out = tmp_path / "rel"
    assert main(["release", "build", "--run", str(run), "--out", str(out)]) == 2
    assert f"no checkpoints in {run / 'checkpoints'}" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_incomplete_run_is_refused(tiny_run, tmp_path, capsys):
    run = copy_tree(tiny_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_000004")
    out = tmp_path / "rel"
    assert main(["release", "build", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "step 2 of schedule.steps=4" in err
    _assert_nothing_written(out)


def test_run_on_different_data_is_refused(tiny_run, prepared_data, tmp_path, capsys):
    run = run_on_other_data(tiny_run, prepared_data, tmp_path)
    out = tmp_path / "rel"
    assert main(["release", "build", "--run", str(run), "--out", str(out)]) == 2
    assert "data fingerprint mismatch" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_corrupt_checkpoint_stops_the_build_midway_and_leaves_nothing(tiny_run, tmp_path, capsys):
    run = copy_tree(tiny_run, tmp_path / "run")
    shard = sorted((run / "checkpoints" / "step_000002" / "dcp").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "rel"
    assert main(["release", "build", "--run", str(run), "--out", str(out)]) == 2
    assert "step_000002" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_every_branch_loads_by_revision_from_a_hub_cache_offline(built_release, tmp_path):
    """Lay the release out as the Hub cache would hold it after a download, then load by `revision=` offline."""
    import hashlib

    from transformers import AutoModelForCausalLM

    repo = tmp_path / "cache" / "models--glassbox-test--tiny"
    index = json.loads((built_release / "release.json").read_text())
    folders = {b["branch"]: built_release / "branches" / b["branch"] for b in index["branches"]}
    folders["main"] = built_release / "model"
    logits = {}
    probe = torch.tensor([index["probe_ids"]])
    for revision, folder in folders.items():
        commit = hashlib.sha1(revision.encode()).hexdigest()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("training_state"))
        model = AutoModelForCausalLM.from_pretrained("glassbox-test/tiny", revision=revision,
                                                     cache_dir=tmp_path / "cache", local_files_only=True)
        with torch.no_grad():
            logits[revision] = model(probe).logits
    assert torch.equal(logits["main"], logits["step00000004"])
    assert not torch.equal(logits["step00000001"], logits["step00000004"])
