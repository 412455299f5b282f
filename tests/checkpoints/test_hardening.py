"""What an adversary can do to a checkpoint: edit its manifest's fields, ship a crafted DCP metadata pickle."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from ckpt_helpers import MiniLoop
from glassbox.atomic import sha256_file
from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.dcp_io import UnsafeMetadata
from glassbox.checkpoints.export import load_model_from_checkpoint
from glassbox.checkpoints.loading import find_resume_checkpoint, load_checkpoint
from glassbox.checkpoints.manifest import CheckpointCorrupt, content_sha256, verify


def _saved(tmp_path):
    loop = MiniLoop(tmp_path)
    loop.step()
    return loop, Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None).save(loop.state)


@pytest.mark.parametrize("edit", ["step", "rope_theta"])
def test_an_edited_manifest_field_is_refused(tmp_path, edit):
    _, path = _saved(tmp_path)
    manifest_path = path / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    if edit == "step":
        manifest["step"] += 1
    else:
        manifest["model"]["rope_theta"] *= 2
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="the manifest was edited"):
        verify(path)
    with pytest.raises(CheckpointCorrupt, match="the manifest was edited"):
        load_model_from_checkpoint(path)
    with pytest.raises(Exception, match="none of the 1 checkpoints"):
        find_resume_checkpoint(tmp_path, "auto", log=lambda m: None)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_metadata_pickle_never_runs(tmp_path):
    loop, path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    meta = path / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload(marker)))
    # Whoever ships it updates the manifest to match, hashes and all.
    manifest_path = path / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["dcp/.metadata"] = {"sha256": sha256_file(meta), "bytes": meta.stat().st_size}
    manifest["manifest_sha256"] = content_sha256(manifest)
    manifest_path.write_text(json.dumps(manifest))
    verify(path)                                   # the files match the manifest: only reading them is the risk
    with pytest.raises(UnsafeMetadata, match=r"\.metadata: refusing to unpickle posix\.system"):
        load_model_from_checkpoint(path)
    with pytest.raises(UnsafeMetadata, match="refusing to unpickle"):
        load_checkpoint(path, MiniLoop(tmp_path / "other").state)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "other-run"])
def test_resume_refuses_a_damaged_or_foreign_data_order_log(prepared_data, tmp_path, damage):
    import shutil

    from ckpt_helpers import run_config
    from glassbox.errors import GlassboxError
    from glassbox.train.trainer import Trainer

    Trainer(run_config(prepared_data, tmp_path / "run", schedule={"steps": 4, "warmup_steps": 2})).fit()
    chunk = tmp_path / "run" / "data_order.zarr" / "rows" / "c" / "0" / "0"
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
        expected = r"data_order\.zarr: the chunk holding steps 1\.\.4096 cannot be read"
    elif damage == "delete":
        chunk.unlink()
        expected = r"data_order\.zarr: step 1 reads as an empty row: the chunk holding steps 1\.\.4096 is missing"
    else:
        Trainer(run_config(prepared_data, tmp_path / "other", batch={"global_batch_size": 4, "micro_batch_size": 4},
                           schedule={"steps": 4, "warmup_steps": 2})).fit()
        shutil.rmtree(tmp_path / "run" / "data_order.zarr")
        shutil.copytree(tmp_path / "other" / "data_order.zarr", tmp_path / "run" / "data_order.zarr")
        expected = r"step 4 ends at sample 16, but the checkpoint's sampler is at 32: the log and the checkpoint disagree"
    resumed = Trainer(run_config(prepared_data, tmp_path / "run", schedule={"steps": 6, "warmup_steps": 2},
                                 checkpoint={"every": 2, "resume": "auto"}))
    with pytest.raises(GlassboxError, match=expected):
        resumed.fit()
