"""Tiny models for the checkpoint tests (imported by name: test folders are not packages)."""

from __future__ import annotations

import torch

from glassbox.models.transformer import ModelConfig, Transformer

EOD = "<|endoftext|>"


def tiny_config(moe: bool = False, tie: bool = False, **overrides) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                max_seq_len=64, rope_theta=10000.0, tie_embeddings=tie)
    if moe:
        base.update(num_experts=4, experts_per_token=2)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A random model whose every tensor matters: norms and router get non-trivial values too."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("router.weight"):
                p.normal_(std=1.0)      # well separated routing: fp32 noise cannot flip a top-k choice
    return model.eval()


class MiniLoop:
    """A real model, AdamW and LR schedule stepped on random tokens drawn from torch's global RNG.

    Drawing the data from the RNG makes exact resume depend on the checkpoint's RNG state as well as on the
    weights, optimizer moments and schedule. Used where the full Trainer (and a prepared corpus) is not needed.
    """

    def __init__(self, run_dir, cfg: ModelConfig | None = None, seed: int = 0):
        from glassbox.train.state import TrainState

        cfg = cfg or tiny_config(tie=True)
        model = tiny_model(cfg, seed).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _Decay())
        self.state = TrainState(config=None, run_dir=run_dir, model=model, optimizer=optimizer,
                                lr_scheduler=schedule, sampler=None, step_plan=None)

    def step(self) -> float:
        s = self.state
        ids = torch.randint(0, s.model.config.vocab_size, (2, 17))
        logits = s.model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.lr_scheduler.step()
        s.step += 1
        s.samples += 2
        s.tokens += 32
        return loss.item()


class _Decay:
    """A picklable-by-state LR factor (LambdaLR saves a callable object's __dict__)."""

    def __call__(self, i: int) -> float:
        return 1.0 / (1.0 + 0.1 * i)


def assert_same_training_state(a, b) -> None:
    """Bit-identical weights, optimizer state and schedule."""
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(x, y), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        for k, v in sa["state"][key].items():
            assert torch.equal(v, sb["state"][key][k]), (key, k)
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()


def run_config(data_dir, run_dir, **sections):
    """A seconds-long Trainer config (hidden 64, 2 layers) over the shared prepared corpus (vocab 512)."""
    from glassbox.train.config import run_config_from_dict

    data = {
        "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 128, "max_seq_len": 32},
        "data": {"path": str(data_dir), "seq_len": 32, "seed": 7},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"steps": 6, "warmup_steps": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "logging": {"val_every": 0, "val_samples": 8, "progress": False, "wandb": {"mode": "disabled"}},
        "parallel": {"device": "cpu"},
        "checkpoint": {"every": 2},
        "run_dir": str(run_dir),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return run_config_from_dict(data)


def losses(run_dir) -> dict[int, float]:
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def order_rows(run_dir) -> list[tuple]:
    from glassbox.data.order_log import DataOrderLog

    log = DataOrderLog(run_dir)
    return [tuple(sorted(log.row(step).items())) for step in range(1, len(log) + 1)]
