"""The Pollux agent: a step plan that the trainer asks for every step's shape, and a callback that measures.

`PolluxPlan` (a glassbox.train.step_plan.StepPlan) answers each step's global batch, micro-batch and LR scale from
the agent's current decision, and counts progress in efficiency-weighted samples (M0 x gain per step), which is
what the LR schedule follows. A step's answer is frozen the first time it is asked (the trainer asks for step t+1
while queueing step t, to prefetch its batch), so a decision made after that applies from the next unasked step.

`PolluxAgent` (a glassbox.train.callbacks.Callback) measures every step: the gradient noise scale from the
step's own norms (glassbox.elastic.gns; queued on the device, copied to the host without waiting, read when the
step has finished: the agent adds no host sync), from steps it splits in two within a time budget and from
consecutive triples between them, and the step time for its shape; every `decide_every` steps it
refits the throughput model, finds the best batch shape for the current allocation (glassbox.elastic.goodput), switches
to it when goodput gains more than `switch_threshold`, and sets the LR scale for the current shape. Rank 0
decides from its own timings and hands the decision to every rank, so all ranks take the same steps. Each
decision is a row of metrics.jsonl ({"event": "pollux", ...}: batch, micro-batch, LR scale, phi, gradient
statistics, fitted throughput parameters, predicted goodput). Under `glassbox elastic run` with `resize` on,
it also asks for the world size whose goodput pays for a restart: it writes RUN_DIR/elastic/request.json and
stops the run cleanly after a final checkpoint (Trainer.request_stop); the launcher restarts it.

The data order never depends on any of this (a step of B samples takes the next B of the global order), and a
run replays from its data-order log without the agent: the log holds each step's batch, micro-batch, LR scale
and progress (release/reproduce.py's ReplayPlan). The agent's state (statistics, observations, decision, frozen
steps) is in every checkpoint, so a resumed run continues with what it had learned.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from glassbox.atomic import write_json
from glassbox.distributed import rank0_decides
from glassbox.elastic.config import ElasticConfig
from glassbox.elastic.gns import GradientNoiseMeter, Measurement, NoiseScaleEMA, estimate_from_pairs
from glassbox.elastic.goodput import GoodputModel, should_switch
from glassbox.elastic.lr_scaling import gain, lr_scale, progress_of_step
from glassbox.elastic.throughput import (StepObservation, ThroughputParams, fit_throughput, predict_step_time,
                                         probe_max_micro_batch)
from glassbox.errors import GlassboxError
from glassbox.train.callbacks import Callback
from glassbox.train.step_plan import StepPlan, StepSpec

if TYPE_CHECKING:
    from glassbox.train.trainer import Trainer

MAX_SPLIT = 4              # a measured step is split into at most this many micro-batches
PROBE_RESOLUTION = 0.125   # the memory probe stops within 12.5% below the wall: ~3 passes near it, not ~log2(m)
OBSERVATIONS_KEPT = 32      # step times kept per batch shape (their median is the shape's observation)
MEDIAN_OBSERVATIONS = 3      # step times of a shape before their median prices it (a split, a candidate)
# Split measurements before their standard error can make them the estimate for good: a spread read from two or
# three estimates can be near zero by chance. The agent splits every other step until its first decision, so on the
# H200 (first decision at step 30) about a dozen are in by then.
SPLIT_TRUST_MEASUREMENTS = 8
NPROC_RANGE_ENV = "GLASSBOX_ELASTIC_NPROC"   # "MIN:MAX", set by `glassbox elastic run` when resizing is allowed


@dataclass(frozen=True)
class Shape:
    batch: int
    micro_batch: int
    lr_scale: float
    gain: float


class PolluxPlan(StepPlan):
    """Steps shaped by the agent's current decision; starts at the configured batch and micro-batch."""

    def __init__(self, base_batch: int, micro_batch: int, measure_every: int = 0):
        super().__init__(base_batch, micro_batch)
        self.shape = Shape(base_batch, micro_batch, 1.0, 1.0)
        self.frozen: dict[int, Shape] = {}
        self.measure_every = measure_every
        # Steps run for the throughput fit (PolluxAgent.on_train_start): in `explore_shape` (a micro-batch twice
        # the size timed) where one is set, else split in two half-size micro-batches.
        self.explore: range = range(0)
        self.explore_shape: Shape | None = None
        self.dp_size = 1

    def _measured_micro(self, step: int, shape: Shape) -> int:
        """A step of one micro-batch per rank is split into micro-batches half its size (a third, a quarter when
        odd), same samples, same gradient, every `measure_every` steps (a second batch size for the noise scale)
        and on the steps in `explore` (a second micro-batch size for the throughput fit), but not on an exploring
        step that times a larger micro-batch."""
        per_rank = shape.batch // self.dp_size
        exploring = step in self.explore
        split = (self.measure_every and step % self.measure_every == 0 and not
                 (exploring and self.explore_shape is not None)) or (exploring and self.explore_shape is None)
        if not split or min(shape.micro_batch, per_rank) < per_rank:
            return shape.micro_batch
        return per_rank // split_divisor(per_rank)

    def spec(self, step: int) -> StepSpec:
        if step not in self.frozen:
            exploring = self.explore_shape is not None and step in self.explore
            self.frozen[step] = self.explore_shape if exploring else self.shape
            for old in [s for s in self.frozen if s < step - 2]:
                del self.frozen[old]
        shape = self.frozen[step]
        return StepSpec(step, shape.batch, self._measured_micro(step, shape), shape.lr_scale, self.progress)

    def advance(self, spec: StepSpec) -> None:
        self.progress = spec.progress + progress_of_step(self.base_batch, self.frozen[spec.step].gain)

    def reshape(self, shape: Shape, after: int) -> None:
        """`shape` from step `after` + 1 on, also for steps already asked (a restart at another world size)."""
        self.shape = shape
        self.frozen = {s: v for s, v in self.frozen.items() if s <= after}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shape": asdict(self.shape), "measure_every": self.measure_every,
                "frozen": [[s, *asdict(v).values()] for s, v in sorted(self.frozen.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shape = Shape(**state["shape"])
        self.measure_every = int(state.get("measure_every", self.measure_every))
        self.frozen = {int(row[0]): Shape(int(row[1]), int(row[2]), float(row[3]), float(row[4]))
                       for row in state["frozen"]}


def finite_or_none(x: float) -> float | None:
    """For a metrics row: JSON has no infinity."""
    return x if math.isfinite(x) else None


def split_divisor(per_rank: int) -> int:
    """Into how many micro-batches a measured step of `per_rank` samples splits: 2, else 3 or 4, else 1 (not
    split): a size with no divisor up to MAX_SPLIT, a prime M, would become M passes of one sample each."""
    return next((d for d in range(2, min(per_rank, MAX_SPLIT) + 1) if per_rank % d == 0), 1)


def nodes_of_world(world_size: int) -> int:
    """Nodes in this job: torchrun's LOCAL_WORLD_SIZE ranks per node (all on one node without torchrun)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    return max(1, -(-world_size // max(1, per_node)))


def nproc_range() -> tuple[int, int] | None:
    text = os.environ.get(NPROC_RANGE_ENV)
    if not text:
        return None
    lo, hi = (int(x) for x in text.split(":"))
    return lo, hi


class PolluxAgent(Callback):
    order = 10
    wants_local_norms = True

    def __init__(self, cfg: ElasticConfig, plan: PolluxPlan):
        self.cfg = cfg
        self.plan = plan
        self.init_batch = plan.base_batch
        self.max_batch = cfg.max_batch or 64 * plan.base_batch
        # Two estimates: from split steps (one point of the weights: unbiased, but a second pass each, so sparse)
        # and from consecutive triples of the steps between (every step, free, but biased while the weights move
        # fast); `ema` is the one decisions use.
        self.split_ema = NoiseScaleEMA(plan.base_batch, cfg.gns_smoothing)
        self.triple_ema = NoiseScaleEMA(plan.base_batch, cfg.gns_smoothing)
        self.times: dict[tuple[int, int, int, int], list[float]] = {}
        self.max_micro = cfg.max_micro_batch
        self.params: ThroughputParams | None = None
        self.decisions = 0
        self.trainer: "Trainer | None" = None
        self._pending: dict[int, tuple[Measurement, torch.Tensor, torch.cuda.Event | None]] = {}
        self._shapes: dict[int, tuple[int, int]] = {}
        self._current = 0
        self._started_at = 0
        self.split_trusted = False
        self.meter: GradientNoiseMeter | None = None

    @property
    def name(self) -> str:
        return "pollux"

    # --- set-up ----------------------------------------------------------------------------------------------

    def setup(self, trainer: "Trainer") -> None:
        if trainer.state.step_plan is not self.plan:
            raise GlassboxError("elastic: the Pollux agent must be given the trainer's step plan (Trainer(plan=...))")
        world = trainer.world
        if world.tp_size > 1:
            raise GlassboxError("elastic: Pollux adapts data-parallel batches; parallel.tensor_parallel must be 1")
        self.trainer = trainer
        self.replicas = world.dp_size
        self.nodes = nodes_of_world(world.world_size)
        self.plan.dp_size = world.dp_size
        self.meter = GradientNoiseMeter(trainer.state.model, trainer.state.optimizer, world.dp_group, world.dp_size,
                                        self.cfg.precondition_every,
                                        consecutive_steps=self.cfg.gns_triples or not self.splits)
        if self.split_trusted:
            self.meter.stop_consecutive_steps()
        # Restored from a checkpoint afterwards where there is one (the interval the last decision set).
        self.plan.measure_every = self.cfg.measure_every or (self.cfg.split_warmup_every if self.cfg.split_budget
                                                             else 0)

    @property
    def ema(self) -> NoiseScaleEMA:
        """The estimate decisions use: the split steps' from the first time its |G|^2 is known to within
        split_precision (over SPLIT_TRUST_MEASUREMENTS splits or more) on (`split_trusted`), the triples' before
        that, else the split steps' as it stands.
        The triples are the fallback for runs whose splits cannot read |G|^2 (the 2-core CPU's tiny model, phi ~50
        batches: one split's |G|^2 spreads 5-17x its value, and a sparse average of them reads phi as 0 or
        thousands). Where the splits can, the triples are worse: they read the weights' drift as noise while the
        loss falls fast (1.5-10x the direct value on the H200), so the choice does not go back to them when one
        noisy split widens the error again; on the H200 (session 15) decisions that did swung the batch between
        40 and 244, on phi ~45 (splits) against 800-3400 (triples)."""
        split, triple = self.split_ema, self.triple_ema
        if self.split_trusted and split.ready:
            return split
        return triple if triple.ready else split

    def _split_is_precise(self) -> bool:
        split = self.split_ema
        return split.ready and split.trace > 0 and split.count >= SPLIT_TRUST_MEASUREMENTS and \
            split.grad_sqr_rel_error <= self.cfg.split_precision

    def _trust_splits(self) -> None:
        """From now on decide on the split estimate, and stop measuring triples (a copy of the gradient and a norm
        every step, which a host-bound GPU loop pays for in full)."""
        self.split_trusted = True
        if self.meter is not None:      # else setup, which builds it, stops it
            self.meter.stop_consecutive_steps()

    @property
    def gns_source(self) -> str:
        """Which estimate `ema` is: "split" or "triple"."""
        return "split" if self.ema is self.split_ema else "triple"

    @property
    def splits(self) -> bool:
        """Whether steps of one micro-batch per rank are split to measure the noise scale (else: triples)."""
        return bool(self.cfg.measure_every or self.cfg.split_budget)

    def on_train_start(self, state) -> None:
        self._started_at = state.step
        if not self.max_micro:
            # Only a batch-choosing agent needs the memory wall; a measuring one (adapt_batch off) keeps its shape.
            probe = self.cfg.adapt_batch and self.trainer.world.device.type == "cuda" and self.replicas == 1
            self.max_micro = self._probe() if probe else self.plan.micro_batch
        if self.plan.shape.batch % self.replicas or not self._fits(self.plan.shape):
            # A restart at another world size: the last shape may not split over these ranks.
            self._reshape_for_world(state)
        if self.cfg.adapt_batch and len({key[2] for key in self.times}) < 2:
            # One micro-batch size seen: its step time alone cannot split a pass's fixed cost from its per-sample
            # cost, and the prior's split (mostly per-sample) would keep a GPU run whose passes are mostly fixed
            # cost at M0. A few steps at a second size settle it, from the sixth step on: the first steps after a
            # start warm caches and allocators and run slower.
            self.plan.explore = range(state.step + 6, state.step + 6 + self.cfg.explore_steps)
            self.plan.explore_shape = self._explore_shape(self.plan.shape)

    def _explore_shape(self, shape: Shape) -> Shape | None:
        """The exploring steps' shape: micro-batches twice the size, where they fit, so that the throughput line
        is drawn through the sizes decisions choose between, not below them. A GPU's pass time is nearly flat at
        small micro-batches: on the H200 the line through 16 and 32 predicted 1340 samples/s at 63 where the card
        gave 990, and the run grew its batch early. A step that accumulates keeps its batch in half as many
        passes; a step of one micro-batch per rank doubles its batch, at the LR scale and progress of one M0 step
        (the gain is not known yet, and 1 is its lower bound). None (split in halves instead) where twice the
        micro-batch exceeds max_micro or twice the batch max_batch."""
        per_rank = shape.batch // self.replicas
        micro = min(shape.micro_batch, per_rank)
        if 2 * micro > self.max_micro:
            return None
        if per_rank % (2 * micro) == 0:
            return Shape(shape.batch, 2 * micro, shape.lr_scale, shape.gain)
        if micro == per_rank and 2 * shape.batch <= self.max_batch:
            return Shape(2 * shape.batch, 2 * micro, 1.0, 1.0)
        return None

    def _fits(self, shape: Shape) -> bool:
        per_rank = shape.batch // self.replicas
        return shape.micro_batch <= self.max_micro and per_rank % min(shape.micro_batch, per_rank) == 0

    def _probe(self) -> int:
        """The largest micro-batch whose forward/backward fits in GPU memory with room for AdamW's moments."""
        trainer = self.trainer
        model, device = trainer.state.model, trainer.world.device
        seq = trainer.cfg.data.seq_len
        vocab = trainer.cfg.model.vocab_size
        moments = sum(8 * p.numel() for p in model.parameters() if p.requires_grad) \
            if not trainer.state.optimizer.state else 0
        budget = 0.9 * torch.cuda.get_device_properties(device).total_memory - moments
        gen = torch.Generator(device=device).manual_seed(0)

        def fits(m: int) -> bool:
            torch.cuda.reset_peak_memory_stats(device)
            try:
                tokens = torch.randint(0, vocab, (m, seq + 1), device=device, generator=gen)
                with trainer._autocast():
                    logits = model(tokens[:, :-1])
                trainer._loss(logits, tokens[:, 1:]).backward()
                torch.cuda.synchronize(device)
                ok = torch.cuda.max_memory_allocated(device) <= budget
            except torch.OutOfMemoryError:
                ok = False
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return ok

        limit = min(self.max_batch, 4096)
        tries: list[int] = []
        started = time.perf_counter()
        found = probe_max_micro_batch(lambda m: tries.append(m) or fits(m), self.plan.micro_batch, limit,
                                      PROBE_RESOLUTION)
        seconds = time.perf_counter() - started
        if trainer.world.is_main:
            print(f"[pollux] the largest micro-batch that fits: {found} samples of {seq} tokens "
                  f"({len(tries)} passes, {seconds:.1f} s)")
            trainer.metrics_log.append({"event": "pollux_probe", "step": trainer.state.step, "max_micro_batch": found,
                                        "tried": tries, "probe_s": seconds})
        return found

    # --- measuring --------------------------------------------------------------------------------------------

    def on_step_start(self, state, spec: StepSpec, tokens: torch.Tensor) -> None:
        self._current = spec.step
        per_rank = spec.global_batch // self.replicas
        micro = min(spec.micro_batch, per_rank)
        self._shapes[spec.step] = (micro, per_rank // micro)

    def on_after_backward(self, state, grads) -> None:
        # Called while the step is being queued (the device still computing the step before): no host read here.
        measurement = self.meter.measure(self._current, grads.local_tensor_sq_norms, grads.micro_batch,
                                         grads.global_batch)
        if measurement is None:
            return
        values, ready = measurement.values, None
        if values.device.type == "cuda":
            # Copied into pinned host memory behind the step's work, read once the step has finished.
            values = values.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._pending[self._current] = (measurement, values, ready)

    def on_step_end(self, state) -> None:
        step = state.step
        measured = self._pending.pop(step, None)
        if measured is not None:
            measurement, values, ready = measured
            if ready is not None:
                ready.synchronize()     # already done: the trainer has read this step's metrics, queued after it
            self.record_estimate(step, measurement.kind, *estimate_from_pairs(measurement.pairs(values.tolist())),
                                 samples=measurement.samples)
        micro, accum = self._shapes.pop(step)
        # The first steps after a (re)start compile and warm allocators: not the shape's speed.
        if step > self._started_at + 2 and "val_loss" not in state.metrics and "val_kl" not in state.metrics:
            times = self.times.setdefault((self.nodes, self.replicas, micro, accum), [])
            times.append(float(state.metrics["step_time"]))
            del times[:-OBSERVATIONS_KEPT]
        if step >= self._started_at + self.cfg.warmup_steps and step % self.cfg.decide_every == 0:
            self._decide(state)

    def record_estimate(self, step: int, kind: str, grad_sqr: float, trace: float, samples: int) -> None:
        """One measurement into its moving average ("split" or "triple"); the first time the split one is
        precise, decisions move to it for good (`ema`)."""
        (self.split_ema if kind == "split" else self.triple_ema).update(grad_sqr, trace, batch=samples)
        if kind == "split" and not self.split_trusted and self._split_is_precise():
            self._trust_splits()
            if self.trainer is not None and self.trainer.world.is_main:
                self.trainer.metrics_log.append({"event": "pollux_split_trusted", "step": step,
                                                 "split_grad_sqr_rel_error": self.split_ema.grad_sqr_rel_error,
                                                 "noise_scale_split": self.split_ema.noise_scale})

    # --- deciding ---------------------------------------------------------------------------------------------

    def observations(self) -> list[StepObservation]:
        return [StepObservation(n, k, m, a, statistics.median(t)) for (n, k, m, a), t in sorted(self.times.items())
                if t]

    def goodput_model(self) -> GoodputModel | None:
        obs = self.observations()
        if not obs or not self.ema.ready:
            return None
        self.params = fit_throughput(obs, start=self.params)
        measured = {key: statistics.median(t) for key, t in self.times.items() if len(t) >= MEDIAN_OBSERVATIONS}
        return GoodputModel(self.params, self.ema.grad_sqr, self.ema.grad_var, self.init_batch, measured)

    def micro_batch_range(self) -> tuple[int, int]:
        """The micro-batches a decision may choose: up to max_micro, and up to max_micro_growth x the largest
        one timed so far, where the throughput fit is an interpolation rather than a guess."""
        top = self.max_micro
        timed = [m for (_, _, m, _), t in self.times.items() if t]
        if self.cfg.max_micro_growth and timed:
            top = min(top, max(1, int(self.cfg.max_micro_growth * max(timed))))
        return 1, top

    def _measurable(self, best) -> tuple[int, int]:
        """(batch, micro) of a chosen shape, one sample per rank smaller when it is a single odd micro-batch per
        rank that measure_every would have to split: an even one splits in halves (goodput differs by ~1/M)."""
        per_rank = best.batch // self.replicas
        if self.splits and best.accum_steps == 1 and per_rank % 2 and \
                (per_rank - 1) * self.replicas >= self.init_batch:
            return (per_rank - 1) * self.replicas, per_rank - 1
        return best.batch, best.micro_batch

    def _shape_for(self, batch: int, micro: int) -> Shape:
        r = gain(self.ema.grad_sqr, self.ema.grad_var, self.init_batch, batch) if self.ema.ready else 1.0
        return Shape(batch, micro, lr_scale("adam", r) if self.cfg.scale_lr else 1.0,
                     r if self.cfg.scale_lr else batch / self.init_batch)

    def _decide(self, state) -> None:
        started = time.perf_counter()
        if self.splits:     # the triples are the splits' fallback: one per decision from now on
            self.meter.space_triples(self.cfg.decide_every)
        decision = rank0_decides(lambda: self._choose(state.step))
        self.plan.shape = Shape(**decision["shape"])
        self.plan.measure_every = decision["row"]["measure_every"]
        self.decisions += 1
        if self.trainer.world.is_main:
            # What deciding cost the loop (the fit, the candidates, handing the decision to the other ranks): it
            # lands in the next step's time, so a time to target counts it.
            self.trainer.metrics_log.append({**decision["row"], "decide_s": time.perf_counter() - started})
            request = decision.get("resize")
            if request:
                write_json(self.trainer.run_dir / "elastic" / "request.json", request)
        if decision.get("resize"):
            self.trainer.request_stop()

    def _choose(self, step: int) -> dict[str, Any]:
        """Rank 0: the shape for the coming steps, its metrics row, and a resize request where one pays."""
        current = self.plan.shape
        micro_range = self.micro_batch_range()
        model = self.goodput_model()
        phi = self.ema.noise_scale
        row: dict[str, Any] = {"event": "pollux", "step": step, "noise_scale": None if math.isnan(phi) else phi,
                               "grad_sqr": self.ema.grad_sqr, "grad_var": self.ema.grad_var,
                               "gns_source": self.gns_source,
                               **{f"noise_scale_{k}": v.noise_scale if v.ready else None
                                  for k, v in (("split", self.split_ema), ("triple", self.triple_ema))},
                               "split_grad_sqr_rel_error": finite_or_none(self.split_ema.grad_sqr_rel_error),
                               "max_micro_batch": self.max_micro, "trusted_micro_batch": micro_range[1],
                               "replicas": self.replicas, "nodes": self.nodes,
                               "init_batch": self.init_batch, "max_batch": self.max_batch}
        shape, switched, resize = current, False, None
        if model is not None:
            row["throughput_params"] = self.params.to_dict()
            per_rank = current.batch // self.replicas
            accum = per_rank // min(current.micro_batch, per_rank)
            now = model.goodput(self.nodes, self.replicas, min(current.micro_batch, per_rank), accum)
            best = model.best(self.nodes, self.replicas, self.max_batch, micro_range)
            row.update(predicted_goodput=now, best=best.to_dict())
            if self.cfg.adapt_batch and should_switch(now, best.goodput, self.cfg.switch_threshold):
                shape, switched = self._shape_for(*self._measurable(best)), True
                now = best.goodput
            else:
                shape = self._shape_for(current.batch, current.micro_batch)
            resize = self._resize_request(model, now, step, micro_range)
        row["measure_every"] = self._split_interval(shape)
        row.update(batch=shape.batch, micro_batch=shape.micro_batch,
                   accum_steps=shape.batch // self.replicas // min(shape.micro_batch, shape.batch // self.replicas),
                   lr_scale=shape.lr_scale, gain=shape.gain,
                   efficiency=shape.gain * self.init_batch / shape.batch, switched=switched)
        if resize:
            row["resize"] = resize
        return {"shape": asdict(shape), "row": row, "resize": resize}

    def _split_interval(self, shape: Shape) -> int:
        """Steps between split steps for `shape`, the longest that keeps their extra passes within split_budget of
        the step time, and 2 at least (a pass's fixed cost makes a split step of a small model on a GPU cost
        ~1.5x); measure_every where set, and the warm-up interval until a throughput fit exists. Both step times
        are the medians observed where each shape has run a few times and they say a split costs more (an early
        fit, through two micro-batch sizes, can put the split's cost anywhere), else the fit's. Unused (unchanged)
        for a shape that accumulates: its micro-batches measure the noise scale at no extra cost."""
        current = self.plan.measure_every
        per_rank = shape.batch // self.replicas
        divisor = split_divisor(per_rank)
        if self.cfg.measure_every or not self.cfg.split_budget or self.params is None or divisor == 1 or \
                min(shape.micro_batch, per_rank) < per_rank:
            return current
        whole, split = ((self.nodes, self.replicas, per_rank, 1), (self.nodes, self.replicas, per_rank // divisor,
                                                                   divisor))
        t_whole, t_split = (predict_step_time(self.params, *key) for key in (whole, split))
        if all(len(self.times.get(key, ())) >= MEDIAN_OBSERVATIONS for key in (whole, split)):
            observed = [statistics.median(self.times[key]) for key in (whole, split)]
            # A second pass is never free: medians that say so (whole steps timed just after a switch, warming a
            # new shape; on the H200 they priced splits at batch 244 as free and split every other step) are
            # noise, and the fit's price stands.
            if observed[1] > observed[0]:
                t_whole, t_split = observed
        # At least every other step whole: a run that split every step would never time a whole step again, and
        # an early, slow median of them would price every later split as free.
        return max(2, math.ceil(max(t_split - t_whole, 0.0) / (self.cfg.split_budget * t_whole)))

    def _resize_request(self, model: GoodputModel, now: float, step: int, micro_range: tuple[int, int]
                        ) -> dict[str, Any] | None:
        """Another world size, when its goodput beats this one's by the threshold and the time it saves on the
        rest of the run (in efficiency-weighted samples) exceeds the restart penalty."""
        allowed = nproc_range() if self.cfg.resize else None
        if allowed is None:
            return None
        remaining = max(0.0, self.trainer.cfg.schedule.steps * self.init_batch - self.plan.progress)
        best_k, best_g = self.replicas, now
        for k in range(allowed[0], allowed[1] + 1):
            if k == self.replicas:
                continue
            try:
                g = model.best(1, k, self.max_batch, micro_range).goodput
            except GlassboxError:
                continue
            if g > best_g:
                best_k, best_g = k, g
        if best_k == self.replicas or not should_switch(now, best_g, self.cfg.switch_threshold):
            return None
        saved = remaining / now - remaining / best_g
        if saved <= self.cfg.restart_penalty_s:
            return None
        return {"nproc": best_k, "step": step, "predicted_goodput": best_g, "current_goodput": now,
                "time_saved_s": saved, "reason": "goodput"}

    def _reshape_for_world(self, state) -> None:
        """After a restart at another world size: the best shape for the new allocation, or the configured batch
        split over the new ranks when there is no model yet."""
        model = self.goodput_model()
        if model is not None:
            best = model.best(self.nodes, self.replicas, self.max_batch, self.micro_batch_range())
            shape = self._shape_for(*self._measurable(best))
        else:
            batch = max(self.init_batch, self.plan.shape.batch)
            batch += (-batch) % self.replicas
            per_rank = batch // self.replicas
            micro = max(m for m in range(1, min(per_rank, self.max_micro) + 1) if per_rank % m == 0)
            shape = self._shape_for(batch, micro)
        self.plan.reshape(shape, after=state.step)
        if self.trainer.world.is_main:
            self.trainer.metrics_log.append({"event": "pollux", "step": state.step, "batch": shape.batch,
                                             "micro_batch": shape.micro_batch, "lr_scale": shape.lr_scale,
                                             "gain": shape.gain, "replicas": self.replicas, "reshaped": True})

    # --- checkpointed state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"split_ema": self.split_ema.state_dict(), "triple_ema": self.triple_ema.state_dict(),
                "times": [[*k, v] for k, v in sorted(self.times.items())], "max_micro": self.max_micro,
                "decisions": self.decisions, "params": self.params.to_dict() if self.params else None,
                "split_trusted": self.split_trusted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema" in state:      # a checkpoint from before split steps: its one estimate came from triples
            self.triple_ema.load_state_dict(state["ema"])
        else:
            self.split_ema.load_state_dict(state["split_ema"])
            self.triple_ema.load_state_dict(state["triple_ema"])
        self.times = {tuple(int(x) for x in row[:4]): [float(t) for t in row[4]] for row in state["times"]}
        self.max_micro = self.cfg.max_micro_batch or int(state["max_micro"])
        self.decisions = int(state["decisions"])
        self.params = ThroughputParams.from_dict(state["params"]) if state["params"] else None
        if state.get("split_trusted"):
            self._trust_splits()
