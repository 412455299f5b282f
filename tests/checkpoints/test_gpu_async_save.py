"""Async save on a GPU: the device-to-host copy overlaps the next step, which still cannot corrupt the save."""

from __future__ import annotations

import pytest
import torch

from ckpt_helpers import tiny_config, tiny_model
from glassbox.checkpoints.checkpointer import Checkpointer
from glassbox.checkpoints.config import CheckpointConfig
from glassbox.checkpoints.loading import load_checkpoint
from glassbox.checkpoints.manifest import verify
from glassbox.train.state import TrainState

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _state(run_dir, seed: int) -> TrainState:
    model = tiny_model(tiny_config(vocab_size=4096, hidden_size=256, intermediate_size=1024), seed).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return TrainState(config=None, run_dir=run_dir, model=model, optimizer=optimizer, lr_scheduler=None,
                      sampler=None, step_plan=None)


def _step(state: TrainState) -> None:
    ids = torch.randint(0, 4096, (4, 65), device="cuda")
    loss = torch.nn.functional.cross_entropy(state.model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def test_async_save_on_gpu_keeps_the_saved_step(tmp_path):
    state = _state(tmp_path, 0)
    _step(state)
    expected = {k: v.detach().cpu().clone() for k, v in state.model.state_dict().items()}
    ckpt = Checkpointer(CheckpointConfig(async_save=True), tmp_path, log=print)
    path = ckpt.save(state)
    for _ in range(3):                       # the first optimizer step waits for the host copy
        _step(state)
    ckpt.wait()
    manifest = verify(path)
    assert manifest["stall_seconds"] > 0
    other = _state(tmp_path, 1)
    _step(other)
    load_checkpoint(path, other)
    for name, tensor in other.model.state_dict().items():
        assert torch.equal(tensor.cpu(), expected[name]), name
