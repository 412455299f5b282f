"""Checkpoints holding subsets of the state: resume, export, retention and corruption through the index."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import losses, run_config
from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.export import load_model_from_checkpoint
from glassbox.checkpoints.index import CheckpointIndex
from glassbox.checkpoints.layout import list_checkpoints
from glassbox.checkpoints.manifest import CheckpointCorrupt, read_manifest
from glassbox.errors import GlassboxError
from glassbox.train.trainer import Trainer

torch.set_num_threads(1)
FROZEN = {"lr": 1e-2, "min_lr": 1e-3, "frozen": ["layers.0.*"]}
FROZEN_NAME = "layers.0.mlp.gate_proj.weight"


def _frozen_run(data, run, steps_before_stop=None, **checkpoint):
    trainer = Trainer(run_config(data, run, optimizer=FROZEN, checkpoint={"every": 2, **checkpoint}))
    if steps_before_stop is None:
        trainer.fit()
        return trainer
    trainer.dispatch("on_train_start")
    for _ in range(steps_before_stop):
        trainer.train_step()
        trainer.dispatch("on_step_end")
    return trainer


def test_a_state_spread_over_checkpoints_resumes_and_exports_exactly(prepared_data, tmp_path):
    straight = _frozen_run(prepared_data, tmp_path / "a")
    _frozen_run(prepared_data, tmp_path / "b", steps_before_stop=5)       # saved 2 (all) and 4 (trainable only)
    root = tmp_path / "b" / "checkpoints"
    second = read_manifest(root / "step_000004")
    assert second["tensors"][FROZEN_NAME]["step"] == 2 and "chunks" not in second["tensors"][FROZEN_NAME]
    assert second["tensors"]["layers.1.mlp.gate_proj.weight"]["step"] == 4 and second["exact"] is True
    assert len(CheckpointIndex(root).view(4).sources()) == 2

    resumed = Trainer(run_config(prepared_data, tmp_path / "b", optimizer=FROZEN,
                                 checkpoint={"every": 2, "resume": "auto"}))
    resumed.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    for (name, x), y in zip(straight.state.model.named_parameters(), resumed.state.model.parameters()):
        assert torch.equal(x, y), name

    exported, _ = load_model_from_checkpoint(root / "step_000006")
    live = straight.state.model.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, live[name]), name


def test_retention_keeps_what_the_index_needs(prepared_data, tmp_path):
    _frozen_run(prepared_data, tmp_path, keep_last=1)
    root = tmp_path / "checkpoints"
    # keep_last=1 keeps step 6; step 2 holds its frozen tensors, so it stays too; step 4 goes.
    assert [s for s, _ in list_checkpoints(root)] == [2, 6]
    load_model_from_checkpoint(root / "step_000006")


def test_a_corrupt_or_missing_tensor_is_named_and_never_loaded(prepared_data, tmp_path):
    _frozen_run(prepared_data, tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    rel, offset, length, _ = read_manifest(root / "step_000002")["tensors"][FROZEN_NAME]["chunks"][0]
    victim = root / "step_000002" / rel
    data = bytearray(victim.read_bytes())
    data[offset + length - 1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match=rf"step_000002: tensor {FROZEN_NAME}\.weight: sha256 mismatch"):
        load_model_from_checkpoint(root / "step_000006")
    fresh = Trainer(run_config(prepared_data, tmp_path / "other", optimizer=FROZEN))
    before = {k: v.clone() for k, v in fresh.state.model.state_dict().items()}
    from glassbox.checkpoints.loading import load_checkpoint

    with pytest.raises(GlassboxError, match=FROZEN_NAME):
        load_checkpoint(root / "step_000006", fresh.state)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state.model.state_dict().items())   # nothing loaded

    import shutil

    shutil.rmtree(root / "step_000002")
    with pytest.raises(CheckpointCorrupt, match=r"tensor layers\.0\.\S+ comes from step 2, which is not readable"):
        CheckpointIndex(root).view(6)


def test_save_of_chosen_keys_refers_to_the_rest(prepared_data, tmp_path):
    trainer = Trainer(run_config(prepared_data, tmp_path, checkpoint={"every": 0, "save_final": False}))
    ckpt = Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None)
    with pytest.raises(GlassboxError, match="has no earlier copy"):
        ckpt.save(trainer.state, keys=["layers.1.*"])
    ckpt.save(trainer.state)
    trainer.train_step()
    path = ckpt.save(trainer.state, keys=["layers.1.*"])
    manifest = read_manifest(path)
    assert manifest["exact"] is False                       # the other tensors changed since step 0
    assert {n for n, t in manifest["tensors"].items() if t["step"] == 1} == {
        n for n in manifest["tensors"] if n.startswith("layers.1.")}
    view = CheckpointIndex(tmp_path / "checkpoints").view(1)
    view.verify()
    assert view.steps() == {0, 1} and not view.exact


def test_a_spread_view_consolidates_into_one_exact_directory(prepared_data, tmp_path):
    from glassbox.checkpoints.consolidate import consolidate
    from glassbox.checkpoints.loading import checkpoint_view, load_checkpoint

    straight = _frozen_run(prepared_data, tmp_path / "run")
    view = CheckpointIndex(tmp_path / "run" / "checkpoints").view(6)
    assert len(view.sources()) == 2
    copy = consolidate(view, tmp_path / "elsewhere" / "training_state")
    alone = checkpoint_view(copy)
    alone.verify()
    assert list(alone.sources()) == [copy]
    assert alone.tensors[FROZEN_NAME].step == 2 and alone.tensors["layers.1.mlp.gate_proj.weight"].step == 6
    exported, _ = load_model_from_checkpoint(copy)
    live = straight.state.model.state_dict()
    assert all(torch.equal(t, live[n]) for n, t in exported.state_dict().items())
    other = Trainer(run_config(prepared_data, tmp_path / "other", optimizer=FROZEN))
    load_checkpoint(copy, other.state)
    a, b = straight.state.optimizer.state_dict()["state"], other.state.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
