"""The Pollux agent's settings: a typed section of its own, read from `--elastic FILE` and `--elastic-set KEY=VALUE`.

Kept out of the run config (glassbox.train.config.RunConfig) on purpose: a run config describes the training a
replay must reproduce, and an adaptive run replays from its data-order log without the agent (its decisions are
in the log), so the agent's knobs are not part of it. `glassbox elastic run` writes the resolved section to
RUN_DIR/elastic.yaml beside config.yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from glassbox.config import ConfigError, apply_overrides, from_dict, load_yaml


@dataclass
class ElasticConfig:
    adapt_batch: bool = True        # choose batch and micro-batch by goodput; False: keep the configured ones and
                                    # only measure (the fixed-batch baseline, and the GNS overhead bench)
    scale_lr: bool = True           # sqrt-AdaScale the learning rate (AdamW) and weight progress by efficiency
    max_batch: int = 0              # largest global batch; 0: 64 x batch.global_batch_size
    max_micro_batch: int = 0        # largest micro-batch per rank; 0: probed on CUDA (the largest that fits),
                                    # batch.micro_batch_size on CPU (no memory wall to find there)
    decide_every: int = 10          # steps between goodput decisions
    warmup_steps: int = 5           # steps before the first decision (Adam's second moment, first timings)
    gns_smoothing: float = 0.95     # EMA decay per M0 samples of gradient statistics: a window of ~20 M0 samples
                                    # (one-step estimates are noisy, but phi rises several-fold within a short
                                    # run, and 0.99 lagged it: 1.55x the best fixed batch's time on the CPU bench
                                    # against 0.98-1.01x at 0.95)
    precondition_every: int = 10    # steps between refreshes of the Adam preconditioner
    split_budget: float = 0.03      # steps of one micro-batch per rank are split in two (same samples, same
                                    # gradient) to give the noise scale a second batch size at the same weights,
                                    # as often as keeps the split steps' extra passes within this fraction of the
                                    # step time (each decision sets the interval from the step times seen, whole
                                    # and split, or the throughput fit). 0, with measure_every 0: consecutive-step
                                    # triples instead (no extra pass, but on the H200 they read phi 2-10x the
                                    # direct estimate while the weights moved fast:
                                    # bench/results/pollux_gns_trajectory_h200.md)
    split_warmup_every: int = 2     # with split_budget: the interval until the first throughput fit
    split_precision: float = 0.5    # decisions use the consecutive triples' noise scale until the standard
                                    # error of the split steps' |G|^2 is first within this fraction of it (8
                                    # splits at least), then the split steps' (and triples stop)
    gns_triples: bool = True        # with splits on: also measure consecutive triples between the split steps
                                    # (one kept buffer the size of the gradient), the fallback above
    measure_every: int = 0          # N: split every N-th such step whatever it costs (split_budget unused)
    explore_steps: int = 4          # with adapt_batch, while one micro-batch size has been timed: this many
                                    # early steps run micro-batches twice that size (two half-size ones where
                                    # twice would not fit), so the throughput fit can tell a pass's fixed cost
                                    # from its per-sample cost
    switch_threshold: float = 0.05  # change the batch shape only when predicted goodput gains more than this
    max_micro_growth: float = 2.0   # a decision tries micro-batches up to this many times the largest timed
                                    # so far (0: no bound): the throughput fit is a line through the sizes run,
                                    # and a GPU's pass time is nearly flat at small micro-batches, so the line
                                    # through 16 and 32 predicted ~1.7x the H200's real throughput at 245 and
                                    # the run took 2.05x the best fixed batch's time; larger sizes come a
                                    # doubling at a time, each timed before the next is trusted
    resize: bool = False            # under `glassbox elastic run`: ask for another world size when it pays
    restart_penalty_s: float = 30.0  # what a restart costs, weighed against the time it saves

    def validate(self) -> None:
        for name in ("max_batch", "max_micro_batch", "measure_every", "explore_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"elastic.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("decide_every", "precondition_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"elastic.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"elastic.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.split_budget) and 0.0 <= self.split_budget < 1.0):
            raise ConfigError(f"elastic.split_budget: must be in [0, 1), got {self.split_budget}")
        if not (math.isfinite(self.split_precision) and self.split_precision > 0):
            raise ConfigError(f"elastic.split_precision: must be a finite number > 0, got {self.split_precision}")
        if self.split_warmup_every < 1:
            raise ConfigError(f"elastic.split_warmup_every: must be >= 1, got {self.split_warmup_every}")
        if not 0.0 <= self.gns_smoothing < 1.0:
            raise ConfigError(f"elastic.gns_smoothing: must be in [0, 1), got {self.gns_smoothing}")
        if not (math.isfinite(self.max_micro_growth) and (self.max_micro_growth == 0 or self.max_micro_growth >= 1)):
            raise ConfigError(f"elastic.max_micro_growth: must be 0 (no bound) or a finite number >= 1, got "
                              f"{self.max_micro_growth}")
        if not (math.isfinite(self.switch_threshold) and self.switch_threshold >= 0):
            raise ConfigError(f"elastic.switch_threshold: must be a finite number >= 0, got {self.switch_threshold}")
        if not (math.isfinite(self.restart_penalty_s) and self.restart_penalty_s >= 0):
            raise ConfigError(f"elastic.restart_penalty_s: must be a finite number >= 0, got "
                              f"{self.restart_penalty_s}")


def load_elastic_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ElasticConfig:
    """The section from a YAML file (its keys at the top level, or under `elastic:`), then `key=value` overrides."""
    data = load_yaml(path) if path else {}
    if set(data) == {"elastic"}:
        data = data["elastic"] or {}
    return from_dict(ElasticConfig, apply_overrides(data, list(overrides or [])), "elastic")
