"""Saving, verifying, resuming and partially loading checkpoints of a real model and optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_helpers import MiniLoop, assert_same_training_state, tiny_config
from glassbox.checkpoints import dcp_io
from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.layout import list_checkpoints
from glassbox.checkpoints.loading import find_resume_checkpoint, load_checkpoint, load_partial
from glassbox.checkpoints.manifest import CheckpointCorrupt, verify
from glassbox.checkpoints.schedule import is_scheduled, log_spaced_steps, steps_to_delete
from glassbox.errors import GlassboxError


def test_schedule_and_retention():
    assert log_spaced_steps() == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    cfg = CheckpointConfig(every=100, log_spaced=True)
    saved = [s for s in range(1, 951) if is_scheduled(s, cfg, last_step=950)]
    assert saved == [1, 2, 4, 8, 16, 32, 64, 100, 128, 200, 256, 300, 400, 500, 512, 600, 700, 800, 900, 950]
    assert steps_to_delete(saved, cfg) == []                                    # keep_last 0: keep all
    keep = CheckpointConfig(every=100, log_spaced=True, keep_last=2, keep_every=500)
    assert steps_to_delete(saved, keep) == [100, 200, 300, 400, 600, 700, 800]  # last 2, log-spaced, x500 stay
    assert not is_scheduled(5, CheckpointConfig(save_final=False), last_step=5)


def test_save_commits_atomically_with_manifest(tmp_path):
    loop = MiniLoop(tmp_path)
    for _ in range(3):
        loop.step()
    path = Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None).save(loop.state)
    assert path == tmp_path / "checkpoints" / "step_000003"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    manifest = verify(path)
    assert (manifest["step"], manifest["samples"], manifest["tokens"]) == (3, 6, 96)
    shards = {f for f in manifest["files"] if f.endswith(".distcp")}
    assert shards and all(f.startswith("dcp/__0_") for f in shards)           # rank 0's files, one per I/O thread
    assert set(manifest["files"]) - shards == {"dcp/.metadata", "rng/rank_00000.pt", "train_state.pt"}
    names = {n for n, _ in loop.state.model.named_parameters()} | {"lm_head.weight"}
    assert set(manifest["tensors"]) == names
    assert all(t["step"] == 3 for t in manifest["tensors"].values())
    assert manifest["model"]["hidden_size"] == 32


def test_exact_resume_is_bit_identical(tmp_path):
    straight = MiniLoop(tmp_path / "a")
    losses = [straight.step() for _ in range(6)]

    first = MiniLoop(tmp_path / "b")
    head = [first.step() for _ in range(3)]
    Checkpointer(CheckpointConfig(), tmp_path / "b", log=lambda m: None).save(first.state)
    torch.manual_seed(999)                       # the resumed process starts from other RNG states and weights
    resumed = MiniLoop(tmp_path / "b", seed=7)
    path = find_resume_checkpoint(tmp_path / "b", "auto", log=lambda m: None)
    load_checkpoint(path, resumed.state)
    assert resumed.state.step == 3
    tail = [resumed.step() for _ in range(3)]
    assert head + tail == losses
    assert_same_training_state(straight.state, resumed.state)


def test_retention_keeps_last_k(tmp_path):
    loop = MiniLoop(tmp_path)
    ckpt = Checkpointer(CheckpointConfig(every=1, keep_last=2, keep_every=2), tmp_path, log=lambda m: None)
    for _ in range(5):
        loop.step()
        ckpt.save(loop.state)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]


def _two_checkpoints(tmp_path):
    loop = MiniLoop(tmp_path)
    ckpt = Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None)
    loop.step()
    old = ckpt.save(loop.state)
    loop.step()
    new = ckpt.save(loop.state)
    return old, new


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_refused_and_auto_falls_back(tmp_path, damage):
    old, new = _two_checkpoints(tmp_path)
    victim = new / "dcp" / "__0_0.distcp"
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.unlink()
    with pytest.raises(CheckpointCorrupt, match=r"step_000002/dcp/__0_0\.distcp"):
        verify(new)
    with pytest.raises(GlassboxError, match=r"__0_0\.distcp"):
        find_resume_checkpoint(tmp_path, str(new))
    messages = []
    assert find_resume_checkpoint(tmp_path, "auto", log=messages.append) == old
    assert "refusing step_000002" in messages[0] and "__0_0.distcp" in messages[0]
    assert "falling back" in messages[1] and "step_000001" in messages[1]
    resumed = MiniLoop(tmp_path, seed=3)
    load_checkpoint(old, resumed.state)
    assert resumed.state.step == 1


def test_missing_or_bad_manifest_and_fresh_start(tmp_path):
    messages = []
    assert find_resume_checkpoint(tmp_path, "auto", log=messages.append) is None
    assert "starting fresh" in messages[0]
    old, new = _two_checkpoints(tmp_path)
    (new / "MANIFEST.json").write_text("{not json")
    with pytest.raises(CheckpointCorrupt, match="MANIFEST.json"):
        verify(new)
    (old / "MANIFEST.json").unlink()
    with pytest.raises(GlassboxError, match="none of the 2 checkpoints"):
        find_resume_checkpoint(tmp_path, "auto", log=messages.append)
    with pytest.raises(GlassboxError, match="not a checkpoint directory"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_async_save_snapshots_state_and_measures_stall(tmp_path):
    loop = MiniLoop(tmp_path)
    loop.step()
    expected = {k: v.clone() for k, v in loop.state.model.state_dict().items()}
    ckpt = Checkpointer(CheckpointConfig(async_save=True), tmp_path, log=lambda m: None)
    path = ckpt.save(loop.state)
    loop.step()                                  # training goes on while the files are written
    ckpt.wait()
    assert ckpt.last_stall_s is not None and ckpt.last_stall_s > 0
    manifest = verify(path)
    assert manifest["async_save"] is True and manifest["stall_seconds"] == ckpt.last_stall_s
    other = MiniLoop(tmp_path, seed=4)
    load_checkpoint(path, other.state)
    for name, tensor in other.state.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_the_run_stager_survives_dcp_closing_it(tmp_path):
    """torch 2.11 closes the stager's inner copier after every staging, and the stager after a save; the
    checkpointer keeps one stager for the run, whose next save then failed inside the copy of a state holding a
    class object (KeyError: <class 'type'>, seen on an H100)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    loop = MiniLoop(tmp_path)
    stager = dcp_io.make_stager()
    for _ in range(2):
        loop.step()
        model_sd, optim_sd = get_state_dict(loop.state.model, loop.state.optimizer)
        staged = stager.stage({"model": model_sd, "optim": optim_sd, "kind": torch.nn.Linear})
        stager._state_dict_stager.close()                # what DCP does at the end of each staging there
        stager.close()                                   # ... and of each save
        assert staged["kind"] is torch.nn.Linear
        for name, tensor in model_sd.items():
            assert torch.equal(staged["model"][name], tensor), name
    stager.release()


def test_partial_load_by_name_and_shard(tmp_path):
    loop = MiniLoop(tmp_path)
    for _ in range(2):
        loop.step()
    path = Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None).save(loop.state)
    saved = {k: v.clone() for k, v in loop.state.model.state_dict().items()}
    saved_moments = {n: loop.state.optimizer.state[p]["exp_avg"].clone()
                     for n, p in loop.state.model.named_parameters()}
    for _ in range(2):
        loop.step()
    live = {k: v.clone() for k, v in loop.state.model.state_dict().items()}
    steps_before = {n: loop.state.optimizer.state[p]["step"].clone() for n, p in loop.state.model.named_parameters()}

    restored = load_partial(path, loop.state.model, loop.state.optimizer, names=["layers.1.self_attn.*"])
    assert restored == [f"layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]
    params = dict(loop.state.model.named_parameters())
    for name, tensor in loop.state.model.state_dict().items():
        assert torch.equal(tensor, saved[name] if name in restored else live[name]), name
    for name in restored:
        assert torch.equal(loop.state.optimizer.state[params[name]]["exp_avg"], saved_moments[name])
        assert torch.equal(loop.state.optimizer.state[params[name]]["step"], steps_before[name])   # not rewound

    name = "layers.0.mlp.gate_proj.weight"          # [48, 32]: shard 1 of 2 is rows 24..47
    load_partial(path, loop.state.model, loop.state.optimizer, names=[name], shard=(1, 2))
    tensor = loop.state.model.state_dict()[name]
    assert torch.equal(tensor[:24], live[name][:24]) and torch.equal(tensor[24:], saved[name][24:])
    moment = loop.state.optimizer.state[params[name]]["exp_avg"]
    assert torch.equal(moment[24:], saved_moments[name][24:]) and not torch.equal(moment[:24], saved_moments[name][:24])

    with pytest.raises(GlassboxError, match="no parameter matches"):
        load_partial(path, loop.state.model, names=["nothing.*"])


@pytest.mark.parametrize("moe", [False, True], ids=["dense-tied", "moe-tied"])
def test_export_command_writes_a_loadable_model(tmp_path, moe):
    from transformers import AutoModelForCausalLM

    from glassbox.cli import main

    loop = MiniLoop(tmp_path, tiny_config(moe=moe, tie=True))
    loop.step()
    path = Checkpointer(CheckpointConfig(), tmp_path, log=lambda m: None).save(loop.state)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 20))
    model = loop.state.model.eval()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["MixtralForCausalLM" if moe else "LlamaForCausalLM"]
    assert main(["checkpoint", "verify", str(path)]) == 0
    (path / "train_state.pt").write_bytes(b"garbage")
    assert main(["checkpoint", "verify", str(path)]) == 2
    assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf2")]) == 2
