"""Data and tensor parallel on real gloo process groups match one process at the same global batch.

Two spawned ranks train the same config as FSDP2 over 2 ranks, DDP over 2 ranks, and tensor parallel of degree 2
(dense, and MoE with attention-only TP); four ranks train it as FSDP2 x TP (2 x 2, dense and MoE); one process
trains it alone. Per-step losses, gradient norms, validation loss and the final weights agree to float tolerance:
the reductions add in a different order, and Adam divides by the root of tiny second moments, so a weight whose
gradient is almost zero can move by ~1e-5 differently, well under its total update of ~lr x steps = 4e-2 (the
weights are compared to 5e-4). The global batch (8) is split 4 per rank and accumulated over micro-batches of 2,
so accumulation is exercised on both sides.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glassbox.train.metrics_log import read_metrics
from glassbox.train.trainer import Trainer
from distributed import run_distributed
from train_testlib import tiny_config

COMMON = ("schedule.steps=4", "schedule.warmup_steps=1", "batch.micro_batch_size=2", "logging.val_every=2",
          "logging.val_samples=8")
MOE = ("model.num_experts=4", "model.experts_per_token=2", "model.intermediate_size=64")
LAYOUTS = {
    "fsdp": ("parallel.data_parallel=fsdp",),
    "ddp": ("parallel.data_parallel=ddp",),
    "tp": ("parallel.tensor_parallel=2",),
    "tp-moe": ("parallel.tensor_parallel=2",) + MOE,
}
# Run on 4 ranks: a (dp=2, tp=2) mesh, FSDP2 sharding the tensor-parallel DTensors a second time.
LAYOUTS_2D = {
    "fsdp-tp": ("parallel.tensor_parallel=2",),
    "fsdp-tp-moe": ("parallel.tensor_parallel=2",) + MOE,
}


def _summary(trainer: Trainer, run: Path) -> dict:
    """Losses, grad norms, validation losses and full (unsharded) weights; collective, so every rank calls it."""
    from torch.distributed.tensor import DTensor

    weights = {}
    for name, p in trainer.state.model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        weights[name.removeprefix("module.")] = full.detach().clone()
    rows = read_metrics(run)
    return {"loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            "val": [r["val_loss"] for r in rows if "val_loss" in r], "world": [r["world_size"] for r in rows],
            "weights": weights}


def _train_layouts(rank: int, data_dir: Path, root: Path, layouts: dict) -> dict:
    out = {}
    for name, overrides in layouts.items():
        trainer = Trainer(tiny_config(data_dir, root / name, *COMMON, *overrides), callbacks=[])
        trainer.fit()
        out[name] = _summary(trainer, root / name)
    return out


@pytest.fixture(scope="module")
def parallel_runs(prepared_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parallel")
    runs = run_distributed(_train_layouts, 2, root / "results", prepared_data, root, LAYOUTS)[0]
    root_2d = tmp_path_factory.mktemp("parallel_2d")
    runs.update(run_distributed(_train_layouts, 4, root_2d / "results", prepared_data, root_2d, LAYOUTS_2D)[0])
    return runs


@pytest.fixture(scope="module")
def single_runs(prepared_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("single")
    out = {}
    for moe in (False, True):
        t = Trainer(tiny_config(prepared_data, root / str(moe), *COMMON, *(MOE if moe else ())), callbacks=[])
        t.fit()
        out[moe] = _summary(t, root / str(moe))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS) + list(LAYOUTS_2D))
def test_parallel_layouts_match_one_process(layout, parallel_runs, single_runs):
    got, ref = parallel_runs[layout], single_runs[layout.endswith("moe")]
    assert got["world"] == [4 if layout in LAYOUTS_2D else 2] * 4
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4, abs=1e-6)
    assert got["val"] == pytest.approx(ref["val"], rel=1e-5)
    assert ref["loss"][-1] < ref["loss"][0]
    assert set(got["weights"]) == set(ref["weights"])
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=1e-3, atol=5e-4, msg=name)
