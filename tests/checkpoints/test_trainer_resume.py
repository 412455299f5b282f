"""Resume through the real Trainer: exact on CPU at the same world size, resharded from 2 ranks to 1."""

from __future__ import annotations

import json

import pytest
import torch

from ckpt_helpers import losses, order_rows, run_config
from distributed import run_distributed
from glassbox.checkpoints.layout import list_checkpoints
from glassbox.checkpoints.loading import load_partial
from glassbox.errors import GlassboxError
from glassbox.train.trainer import Trainer

torch.set_num_threads(1)


def _stop_after(trainer: Trainer, steps: int) -> None:
    """Train `steps` steps with the callbacks, then stop as a killed job would (no on_train_end)."""
    for cb in trainer.callbacks:
        cb.on_train_start(trainer.state)
    for _ in range(steps):
        trainer.train_step()
        for cb in trainer.callbacks:
            cb.on_step_end(trainer.state)


def test_stop_and_resume_is_bit_identical(prepared_data, tmp_path):
    straight = Trainer(run_config(prepared_data, tmp_path / "a"))
    straight.fit()
    first = Trainer(run_config(prepared_data, tmp_path / "b"))
    _stop_after(first, 3)                       # saved at step 2; step 3 is lost with the process
    del first
    resumed = Trainer(run_config(prepared_data, tmp_path / "b", checkpoint={"every": 2, "resume": "auto"}))
    resumed.fit()
    assert resumed.state.step == 6
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert order_rows(tmp_path / "b") == order_rows(tmp_path / "a")
    for (name, x), y in zip(straight.state.model.named_parameters(), resumed.state.model.parameters()):
        assert torch.equal(x, y), name
    a, b = straight.state.optimizer.state_dict()["state"], resumed.state.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4, 6]
    assert (tmp_path / "b" / "checkpoints" / "step_000006" / "tokenizer" / "tokenizer.json").is_file()


def test_extending_a_run_follows_the_new_schedule(prepared_data, tmp_path):
    """A run resumed with more steps decays over the new length, exactly as a run planned that long would from
    the resumed step on (the warmup is over, so only the cosine's span differs)."""
    longer = {"steps": 10, "warmup_steps": 2}
    planned = Trainer(run_config(prepared_data, tmp_path / "planned", schedule=longer))
    planned.fit()
    Trainer(run_config(prepared_data, tmp_path / "extended")).fit()          # 6 steps, saved at 6
    extended = Trainer(run_config(prepared_data, tmp_path / "extended", schedule=longer,
                                  checkpoint={"every": 2, "resume": "auto"}))
    extended.fit()
    lrs = {}
    for name in ("planned", "extended"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        lrs[name] = {row["step"]: row["lr"] for row in rows}
    assert extended.state.step == 10
    assert [lrs["extended"][s] for s in range(7, 11)] == pytest.approx([lrs["planned"][s] for s in range(7, 11)])
    assert lrs["extended"][10] == pytest.approx(1e-3)                        # min_lr at the new last step


def test_resume_refuses_changed_data(prepared_data, tmp_path):
    Trainer(run_config(prepared_data, tmp_path, schedule={"steps": 2, "warmup_steps": 1})).fit()
    blend = [{"path": str(prepared_data), "weight": 1.0}, {"path": str(prepared_data), "weight": 2.0}]
    cfg = run_config(prepared_data, tmp_path, data={"path": "", "blend": blend},
                     schedule={"steps": 4, "warmup_steps": 1}, checkpoint={"every": 2, "resume": "auto"})
    with pytest.raises(GlassboxError, match="refusing to resume on different data"):
        Trainer(cfg).fit()


LAYOUTS = {"fsdp2x2": {"data_parallel": "fsdp", "tensor_parallel": 1},
           "tp2": {"data_parallel": "fsdp", "tensor_parallel": 2}}


def _train_sharded(rank: int, data_dir, root) -> None:
    for name, parallel in LAYOUTS.items():
        cfg = run_config(data_dir, root / name, parallel=parallel, schedule={"steps": 4, "warmup_steps": 1})
        trainer = Trainer(cfg)
        trainer.fit()
        if name == "fsdp2x2":
            _check_partial_load_of_dtensors(trainer, root / name / "checkpoints" / "step_000004")


def _check_partial_load_of_dtensors(trainer: Trainer, path) -> None:
    """Zero a live FSDP2 model, restore chunk 1 of 2 of layer 0's tensors: exactly those rows come back."""
    model, optimizer = trainer.state.model, trainer.state.optimizer
    saved = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
    restored = load_partial(path, model, optimizer, names=["layers.0.*"], shard=(1, 2))
    assert restored and all(n.startswith("layers.0.") for n in restored)
    for n, p in model.named_parameters():
        full = p.full_tensor()
        if n in restored:
            half = -(-full.shape[0] // 2)
            assert torch.equal(full[half:], saved[n][half:]), n
            assert not full[:half].any(), n
        else:
            assert not full.any(), n


def test_resume_on_one_rank_from_two(prepared_data, tmp_path):
    """FSDP2 over 2 ranks, and TP=2, each resumed on 1 rank from step 2: same data order, same losses."""
    run_distributed(_train_sharded, 2, tmp_path / "ranks", prepared_data, tmp_path)  # one spawn, both layouts
    for name in LAYOUTS:
        run = tmp_path / name
        manifest = json.loads((run / "checkpoints" / "step_000002" / "MANIFEST.json").read_text())
        assert manifest["world_size"] == 2
        sharded, sharded_order = losses(run), order_rows(run)
        cfg = run_config(prepared_data, run, schedule={"steps": 4, "warmup_steps": 1},
                         checkpoint={"every": 2, "resume": str(run / "checkpoints" / "step_000002")})
        Trainer(cfg).fit()                      # one process, same run directory: steps 3 and 4 again
        single = losses(run)
        for step in (3, 4):
            assert single[step] == pytest.approx(sharded[step], rel=1e-4, abs=1e-5), (name, step)
        assert order_rows(run) == sharded_order
        # The resumed timeline replaced the abandoned one's later checkpoint.
        assert json.loads((run / "checkpoints" / "step_000004" / "MANIFEST.json").read_text())["world_size"] == 1
