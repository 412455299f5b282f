"""What only a GPU can show: bf16 + compile tracks fp32, FSDP2 over two GPUs matches one, async checkpoint stall.

Run through the device tool: `python -m pytest tests/gpu -q -m gpu`. Skipped without CUDA (and the two-GPU
test without two GPUs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glassbox.train.trainer import Trainer
from gpu_testlib import gpu_config, requires_cuda, run_on_gpus

pytestmark = [pytest.mark.gpu, requires_cuda]


def _losses(cfg) -> list[float]:
    trainer = Trainer(cfg, callbacks=[])
    return [trainer.train_step()["loss"] for _ in range(cfg.schedule.steps)]


def test_bf16_compiled_loss_tracks_fp32_over_100_steps(prepared_data: Path, tmp_path: Path):
    fp32 = _losses(gpu_config(prepared_data, tmp_path / "fp32", "parallel.precision=fp32"))
    bf16 = _losses(gpu_config(prepared_data, tmp_path / "bf16", "parallel.precision=bf16", "parallel.compile=true"))
    assert fp32[-1] < fp32[0] - 1.0, f"fp32 run did not learn: {fp32[0]:.3f} -> {fp32[-1]:.3f}"
    # Same data, same init: the curves agree step by step to bf16 rounding, not only at the end.
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(gaps[:10]) < 0.02, gaps[:10]
    assert max(gaps) < 0.1, max(gaps)
    tail = sum(bf16[-10:]) / 10 - sum(fp32[-10:]) / 10
    assert abs(tail) < 0.03, f"bf16 tail mean differs from fp32 by {tail:.4f}"


def _fsdp_losses(rank: int, data_dir: str, run_dir: str) -> list[float]:
    cfg = gpu_config(Path(data_dir), Path(run_dir), "parallel.precision=fp32", "schedule.steps=12",
                     "parallel.data_parallel=fsdp")
    return _losses(cfg)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp2_on_two_gpus_matches_one_gpu_at_the_same_global_batch(prepared_data: Path, tmp_path: Path):
    torch.backends.cuda.matmul.allow_tf32 = False
    one = _losses(gpu_config(prepared_data, tmp_path / "one", "parallel.precision=fp32", "schedule.steps=12"))
    two = run_on_gpus(_fsdp_losses, 2, tmp_path / "spawn", str(prepared_data), str(tmp_path / "two"))
    assert two[0] == two[1], "both ranks must report the same (all-reduced) loss"
    for step, (a, b) in enumerate(zip(one, two[0]), start=1):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), f"step {step}: one GPU {a:.5f}, FSDP2 on two {b:.5f}"


def test_async_checkpoint_stall_under_one_second_at_1b(prepared_data: Path, tmp_path: Path):
    from glassbox.checkpoints.checkpointer import Checkpointer
    from glassbox.checkpoints.config import CheckpointConfig
    from glassbox.checkpoints.layout import checkpoints_root, list_checkpoints

    cfg = gpu_config(
        prepared_data, tmp_path / "run",
        "model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16",
        "model.num_kv_heads=8", "model.intermediate_size=5632", "model.tie_embeddings=false",
        "data.seq_len=128", "batch.global_batch_size=2", "batch.micro_batch_size=2", "parallel.precision=bf16",
        "schedule.steps=10", "schedule.warmup_steps=1",
    )
    assert cfg.model.num_params() > 0.85e9
    trainer = Trainer(cfg, callbacks=[])
    ckpt = Checkpointer(CheckpointConfig(async_save=True), trainer.run_dir, log=lambda _msg: None)
    stalls = []
    for _ in range(2):
        trainer.train_step()
        trainer.train_step()
        ckpt.save(trainer.state)
        stalls.append(ckpt.last_stall_s)
        trainer.train_step()    # training goes on while the files are written
    ckpt.wait()
    assert [s for s, _ in list_checkpoints(checkpoints_root(trainer.run_dir))] == [2, 5]
    print(f"async checkpoint stall at {cfg.model.num_params() / 1e9:.2f}B params: first {stalls[0]:.3f} s, "
          f"second {stalls[1]:.3f} s")
    assert stalls[1] < 1.0, stalls
