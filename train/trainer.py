"""The training loop: one optimizer step at a time over the global sample order, features plugged in as callbacks.

A step t asks the step plan for its spec (global batch B_t, micro-batch, LR scale, progress), takes samples
[cursor, cursor + B_t) from the sampler (each data-parallel rank its contiguous slice), accumulates gradients
over micro-batches, clips, steps AdamW at the LR of its progress, and writes the step's row to metrics.jsonl and
to the data-order log (with the spec, so a replay takes the same steps). Everything that carries over between
steps lives in `TrainState`, so a checkpoint of the state (the checkpoint callback's job) resumes exactly.
A step is queued on the device first and its metrics read back after the next step is queued (`fit`), so the
hot path has no host sync: the device never idles while the host logs, hashes or launches kernels.
The step itself draws no random numbers; Python, numpy and torch are seeded once from `seed` before the model
is built, and their states are what a checkpoint saves.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from glassbox.atomic import sha256_file, write_text
from glassbox.config import ConfigError, dump_yaml
from glassbox.distributed import rank0_decides
from glassbox.errors import GlassboxError
from glassbox.fault_tolerance.callback import ScarCallback
from glassbox.train.callbacks import Callback, GradientStats, ordered
from glassbox.train.checkpointing import CheckpointCallback
from glassbox.train.config import RunConfig
from glassbox.train.flops import peak_flops
from glassbox.train.distill import DistillObjective, marker_ids, train_only_swiftkv
from glassbox.train.init_from import check_tokenizer, load_pretrained, model_factory
from glassbox.train.lr_schedule import build_lr_schedule
from glassbox.train.manifest import write_run_manifest
from glassbox.train.metrics_log import MetricsLog
from glassbox.train.model_init import build_model
from glassbox.models.loss import next_token_loss
from glassbox.models.transformer import unwrap
from glassbox.train.parallel import (
    World,
    clip_gradients,
    grad_sq_norm,
    gradient_sync,
    init_world,
    local_grad_sq_norms,
    param_groups,
)
from glassbox.train.prefetch import BatchPrefetcher
from glassbox.train.progress import ProgressBar
from glassbox.train.state import TrainState
from glassbox.train.step_plan import ReplayPlan, StepPlan, StepSpec, build_step_plan
from glassbox.train.wandb_logger import WandbLogger


@dataclass
class QueuedStep:
    """A step whose work is queued on the device but not yet read back (see `Trainer.queue_step`)."""

    spec: StepSpec
    lr: float
    started: float                      # perf_counter when it was queued
    queue_s: float                      # time to queue it (on a CPU: all of its work)
    scalars: torch.Tensor               # [loss, grad_norm] (+ MoE aux loss), on the device
    expert_load: torch.Tensor | None    # MoE: tokens per expert over the mean (1.0 = balanced)
    val_sums: torch.Tensor | None       # on validation steps: [loss sum, token count] (distillation: KL sum)
    distill_terms: torch.Tensor | None  # distillation: the step's [KL term, hidden-state MSE]
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None   # CUDA: recorded as queuing began, ended


CLOSING_HOOKS = ("on_step_end", "on_train_end")


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks every run gets: checkpointing (first by its order: its on_train_start restores a resumed
    state, which the callbacks after it then see), wandb and the progress bar (last)."""
    dirs = cfg.data.dirs()
    checkpoints = CheckpointCallback(cfg.checkpoint, Path(cfg.run_dir), tokenizer_dir=dirs[0] if dirs else None,
                                     chat_dir=Path(cfg.init_from) if cfg.init_from else None)
    callbacks = [checkpoints, WandbLogger(), ProgressBar(cfg.logging.progress)]
    if cfg.fault_tolerance.enabled:     # SCAR: partial checkpoints, survivor copies, recovery after a restart
        callbacks.append(ScarCallback(cfg.fault_tolerance, Path(cfg.run_dir)))
    return callbacks


# SDPA kernels in order of preference on CUDA: cuDNN attention is faster than flash attention on Hopper.
ATTENTION_KERNELS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def splits_into_micro_batches(global_batch: int, dp_size: int, micro: int) -> bool:
    """Whether each rank's share of `global_batch` is a whole number of micro-batches (a micro-batch larger than
    a rank's share is that whole share)."""
    per_rank = global_batch // dp_size
    return per_rank % min(micro, per_rank) == 0


def check_batch_split(cfg: RunConfig, dp_size: int) -> None:
    """Every configured global batch splits evenly over the data-parallel ranks and each rank's share into
    micro-batches."""
    micro = cfg.batch.micro_batch_size
    sizes = [("batch.global_batch_size", cfg.batch.global_batch_size)] + [
        (f"batch.schedule[{i}].size", stage.size) for i, stage in enumerate(cfg.batch.schedule)]
    for where, size in sizes:
        if size % dp_size:
            raise ConfigError(f"{where} ({size}) must divide by the {dp_size} data-parallel ranks")
        if not splits_into_micro_batches(size, dp_size, micro):
            raise ConfigError(f"{where} ({size}) is {size // dp_size} samples per rank over {dp_size} data-parallel "
                              f"ranks, which batch.micro_batch_size ({micro}) does not divide")


def freeze(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Turn training off for the parameters matching `patterns` (optimizer.frozen); returns their names."""
    names = [n for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if patterns and not names:
        raise GlassboxError(f"optimizer.frozen: no parameter matches {patterns}")
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(False)
    return names


class Trainer:
    """`plan` replaces the step plan the config describes (e.g. Pollux's adaptive one, or a replay)."""

    def __init__(self, cfg: RunConfig, callbacks: list[Callback] | None = None, plan: StepPlan | None = None):
        from glassbox.data.sampler import build_sampler
        from glassbox.data.store import TokenStore, megatron_datasets

        self.cfg = cfg
        self.world: World = init_world(cfg.parallel)
        device = self.world.device
        self.bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and device.type == "cuda")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        check_batch_split(cfg, self.world.dp_size)
        self.callbacks = ordered(default_callbacks(cfg) if callbacks is None else list(callbacks))
        self.run_dir = Path(cfg.run_dir)

        sources = cfg.data.dirs()
        stores = [TokenStore(path) for path in sources]
        for path, store in zip(sources, stores):
            if store.vocab_size > cfg.model.vocab_size:
                raise GlassboxError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
                                    f"{path} ({store.vocab_size})")
        # Rank 0 builds the sampler's index files first so the other ranks only read them. megatron-core's import
        # (seconds) is not part of that: every rank takes it before the barrier, side by side.
        megatron_datasets()
        with self._rank0_first():
            sampler = build_sampler(cfg.data, "train")
            valid = build_sampler(cfg.data, "valid")
        per_rank = max(1, cfg.logging.val_samples // self.world.dp_size)
        if per_rank * self.world.dp_size > valid.epoch_size:
            raise ConfigError(f"logging.val_samples ({cfg.logging.val_samples}) exceeds the {valid.epoch_size} "
                              f"samples of the validation split at data.seq_len {cfg.data.seq_len}")
        val = valid.samples(0, per_rank * self.world.dp_size)
        self.val_tokens = val[self.world.dp_rank * per_rank:(self.world.dp_rank + 1) * per_rank]

        if cfg.init_from:
            check_tokenizer(Path(cfg.init_from), [store.tokenizer_path for store in stores])
        seed_everything(cfg.seed)
        model = build_model(cfg.model, cfg.parallel, self.world, self.bf16, make=model_factory(cfg.init_from))
        if cfg.init_from:
            load_pretrained(model, Path(cfg.init_from))
        freeze(model, cfg.optimizer.frozen)
        # The objective of a micro-batch [B, T + 1] -> its loss: next-token cross-entropy, or distillation.
        self.objective = self._next_token_objective
        if cfg.distill.enabled:
            train_only_swiftkv(model)
            self.objective = DistillObjective(cfg.distill, marker_ids(stores[0].tokenizer(),
                                                                      cfg.distill.response_marker),
                                              stores[0].eod_id, self._autocast)
        # Compiled with the blocks: the fp32 upcast fuses into the cross-entropy, so fp32 logits never hit memory.
        self._loss = torch.compile(next_token_loss) if cfg.parallel.compile else next_token_loss
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
            eps=cfg.optimizer.eps, fused=device.type == "cuda",
        )
        self.prefetcher = BatchPrefetcher(self.world.dp_rank, self.world.dp_size, pin=device.type == "cuda",
                                          digest=self.world.is_main)
        self.state = TrainState(
            config=cfg, run_dir=self.run_dir, model=model, optimizer=optimizer,
            lr_scheduler=build_lr_schedule(cfg.optimizer, cfg.schedule, cfg.batch.global_batch_size),
            sampler=sampler, step_plan=plan if plan is not None else build_step_plan(cfg.batch), world=self.world,
            callback_states={cb.name: cb for cb in self.callbacks if cb.state_dict() is not None},
        )
        if not cfg.data.verify and self.world.is_main:
            print("[data] data.verify is off: the token files are not checked against their hashes (recorded in "
                  "manifest.json)")
        self.data_info = {
            "fingerprint": sampler.fingerprint,
            "verified": cfg.data.verify,
            "sources": [{"path": str(path), "fingerprint": store.fingerprint,
                         "tokenizer_sha256": sha256_file(store.tokenizer_path)}
                        for path, store in zip(sources, stores)],
        }
        self.flops_per_token = cfg.model.flops_per_token(cfg.data.seq_len)
        self.peak = cfg.logging.peak_flops or peak_flops(device, self.bf16)
        self.metrics_log = MetricsLog(self.run_dir)
        self.order_log = None
        self._logged_through: int | None = None
        self._queued = 0                    # steps queued by queue_step and not yet finished
        self._stop_requested = False
        self._last_finish = 0.0
        self._last_end: float | torch.cuda.Event | None = None    # where the last finished step's work ended
        if self.world.is_main:
            from glassbox.data.order_log import DataOrderLog

            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
            self.order_log = DataOrderLog(self.run_dir)
        self._wants_local_norms = any(cb.wants_local_norms for cb in self.callbacks)
        for cb in self.callbacks:
            cb.setup(self)

    def dispatch(self, hook: str, *args) -> None:
        """Call `hook(state, *args)` on every callback: in order, except the closing hooks (`on_step_end`,
        `on_train_end`), which run in reverse, so the checkpoint callback, first to start, saves last, after
        every other callback has updated its state for the step."""
        callbacks = reversed(self.callbacks) if hook in CLOSING_HOOKS else self.callbacks
        for cb in callbacks:
            getattr(cb, hook)(self.state, *args)

    @contextlib.contextmanager
    def _rank0_first(self):
        if self.world.world_size > 1 and not self.world.is_main:
            dist.barrier()
        yield
        if self.world.world_size > 1 and self.world.is_main:
            dist.barrier()

    def _autocast(self):
        """bf16 autocast when training in bf16; on CUDA also SDPA's cuDNN attention ahead of flash, the faster
        kernel on Hopper (docs/performance.md)."""
        stack = contextlib.ExitStack()
        if self.bf16:
            stack.enter_context(torch.autocast(self.world.device.type, dtype=torch.bfloat16))
        if self.world.device.type == "cuda":
            stack.enter_context(sdpa_kernel(ATTENTION_KERNELS, set_priority=True))
        return stack

    def _next_token_objective(self, model: torch.nn.Module, chunk: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = model(chunk[:, :-1])
        return self._loss(logits, chunk[:, 1:])

    def _dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world.dp_size > 1:
            dist.all_reduce(t, group=self.world.dp_group)
            t /= self.world.dp_size
        return t

    def train_step(self) -> dict:
        """Run step `state.step + 1` to completion and return its metrics row."""
        return self.finish_step(self.queue_step())

    def queue_step(self) -> QueuedStep:
        """Queue the next step's work on the device (batch, forward/backward over micro-batches, clip, AdamW, and
        the validation pass on a validation step) and log its data order, without waiting for any of it.

        The step's metrics stay on the device until `finish_step`; until then `state.step` still counts the
        finished steps, while the sampler's cursor has moved past this step's batch. Steps are finished in the
        order they were queued.
        """
        s, cfg, world = self.state, self.cfg, self.world
        step = s.step + self._queued + 1
        started = time.perf_counter()
        began = self._timing_event()
        spec = s.step_plan.spec(step)
        if not isinstance(s.step_plan, ReplayPlan) and not splits_into_micro_batches(
                spec.global_batch, world.dp_size, spec.micro_batch):
            raise GlassboxError(f"step {step}: micro-batch {spec.micro_batch} does not divide the "
                                f"{spec.global_batch // world.dp_size} samples per rank of global batch "
                                f"{spec.global_batch} ({s.step_plan.kind})")
        s.step_plan.advance(spec)
        batch, batch_digest = self.prefetcher.next_batch(s.sampler, spec.global_batch)
        self.dispatch("on_step_start", spec, batch.tokens)

        model, inner = s.model, unwrap(s.model)
        model.train()
        local = batch.tokens
        chunks = local.split(spec.micro_batch)
        local_norms, local_tensor_norms = [], []
        loss_sum = torch.zeros((), device=world.device)
        aux_sum = torch.zeros((), device=world.device)
        load_sum = None
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(world.device, non_blocking=True)
            weight = chunk.shape[0] / local.shape[0]
            last = i == len(chunks) - 1
            with gradient_sync(model, last):
                loss = self.objective(model, chunk)
                total = loss * weight
                aux = inner.aux_loss()
                if aux is not None:
                    total = total + aux * weight
                    aux_sum += aux.detach() * weight
                    load = inner.expert_load() * weight
                    load_sum = load if load_sum is None else load_sum + load
                total.backward()
            loss_sum += loss.detach() * weight
            if self._wants_local_norms and not last:
                local_tensor_norms.append(local_grad_sq_norms(model))
                local_norms.append(local_tensor_norms[-1].sum())

        params = [p for p in model.parameters() if p.requires_grad]
        sq_norm = grad_sq_norm(params)
        stats = GradientStats(local_norms, sq_norm, chunks[0].shape[0], spec.global_batch, local_tensor_norms)
        self.dispatch("on_after_backward", stats)
        grad_norm = sq_norm.sqrt()
        clip_gradients(params, grad_norm, cfg.optimizer.grad_clip)
        lr = s.lr_scheduler.lr(spec.progress) * spec.lr_scale
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        self.dispatch("on_optimizer_step", spec)
        val_every = cfg.logging.val_every
        val = self._validation_sums() if (val_every and step % val_every == 0) or step == cfg.schedule.steps else None
        terms = self._dp_mean(self.objective.step_terms()) if cfg.distill.enabled else None

        # The device has the step's work queued: the host's bookkeeping runs while it computes.
        if self.order_log is not None:
            if self._logged_through != step - 1:
                # This trainer's first step, or a step re-run after a restore: rows from that step on belong to
                # a run that did not survive, and this one writes them again.
                self.metrics_log.truncate(step - 1)
                self.order_log.truncate(step - 1)
            self._logged_through = step
            self.order_log.append(step, batch.start, spec.global_batch, batch_digest, micro_batch_size=spec.micro_batch,
                                  lr_scale=spec.lr_scale, progress=spec.progress)
        if step < cfg.schedule.steps:
            self.prefetcher.prefetch(s.sampler, s.step_plan.spec(step + 1).global_batch)

        scalars = [self._dp_mean(loss_sum), grad_norm.float()]
        if load_sum is not None:
            scalars.append(self._dp_mean(aux_sum))
            load_sum = self._dp_mean(load_sum)
        self._queued += 1
        scalars = torch.stack(scalars)
        ended = self._timing_event()
        return QueuedStep(spec=spec, lr=lr, started=started, queue_s=time.perf_counter() - started,
                          scalars=scalars, expert_load=load_sum, val_sums=val, distill_terms=terms,
                          events=(began, ended) if began is not None else None)

    def _timing_event(self) -> torch.cuda.Event | None:
        if self.world.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _step_time(self, queued: QueuedStep) -> float:
        """The step's share of the run's time: from the previous step's end to this one's, where the work runs
        (the device's timeline on a GPU, the host's on a CPU, where the work runs while the step is queued), the
        host's bookkeeping between the two included; from when its queuing began where nothing was queued ahead
        of it (a checkpoint that drained the loop is not the step's time). Not the wall time between two
        read-backs: the loop queues step t + 1 before it reads step t back, so that is the time to queue and, on
        a CPU or a host-bound GPU (a small model's launches), run the *next* step, and steps of different cost
        alternating read as equal (Pollux priced a split step as free on the H200)."""
        drained = queued.started >= self._last_finish or self._last_end is None
        if queued.events is None:
            end = queued.started + queued.queue_s
            return end - (queued.started if drained else self._last_end)
        began, ended = queued.events
        return (began if drained else self._last_end).elapsed_time(ended) / 1e3

    def finish_step(self, queued: QueuedStep) -> dict:
        """Wait for a queued step, then count it done: its metrics row (one device-to-host read) goes to
        metrics.jsonl and `state.metrics`. A non-finite loss stops the run here, naming the step."""
        s, cfg, world = self.state, self.cfg, self.world
        step, size = queued.spec.step, queued.spec.global_batch
        if step != s.step + 1:
            raise GlassboxError(f"finish_step: step {step} is not the next unfinished step ({s.step + 1})")
        values = queued.scalars.tolist()
        loss_value = values[0]
        if not math.isfinite(loss_value):
            raise GlassboxError(f"training loss became {loss_value} at step {step} (lower optimizer.lr?)")
        self._queued -= 1
        s.step = step
        s.samples += size
        s.tokens += size * cfg.data.seq_len
        elapsed = self._step_time(queued)
        self._last_finish = time.perf_counter()
        self._last_end = queued.events[1] if queued.events is not None else queued.started + queued.queue_s
        tokens_per_s = size * cfg.data.seq_len / elapsed
        row = {
            "step": step, "samples": s.samples, "tokens": s.tokens, "loss": loss_value, "lr": queued.lr,
            "grad_norm": values[1], "batch_size": size, "micro_batch_size": queued.spec.micro_batch,
            "progress": queued.spec.progress + size, "world_size": world.world_size,
            "step_time": elapsed, "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak * world.world_size) if self.peak else 0.0,
        }
        if queued.expert_load is not None:
            load = queued.expert_load.flatten().tolist()
            row.update(moe_aux_loss=values[2], expert_load_max=max(load), expert_load_min=min(load))
        if queued.distill_terms is not None:
            row["kl"], row["hidden_mse"] = queued.distill_terms.tolist()
        if queued.val_sums is not None:
            total, count = queued.val_sums.tolist()
            row["val_kl" if cfg.distill.enabled else "val_loss"] = total / count
        s.metrics = row
        if world.is_main:
            self.metrics_log.append(row)
        return row

    def _check_order_log(self) -> None:
        """A resumed run continues the data-order log: it must hold every step up to the checkpoint's, intact,
        and its last row must end where the restored sampler stands."""
        s = self.state
        row = self.order_log.check(s.step)
        logged_end = row["cursor_start"] + row["batch_size"]
        if logged_end != s.sampler.cursor:
            raise GlassboxError(
                f"{self.order_log.path}: step {s.step} ends at sample {logged_end}, but the checkpoint's sampler "
                f"is at {s.sampler.cursor}: the log and the checkpoint disagree (restore the run's own log)")

    def _validation_sums(self) -> torch.Tensor:
        """[summed next-token loss, token count] over the fixed validation samples (each data-parallel rank an
        equal share, summed over ranks), left on the device; a distillation's objective scores them by their
        KL to the teacher instead."""
        model = self.state.model
        was_training = model.training
        model.eval()
        total = torch.zeros(2, device=self.world.device, dtype=torch.float64)
        if self.cfg.distill.enabled:
            total += self.objective.validation_sums(model, self.val_tokens, self.cfg.batch.micro_batch_size)
        else:
            with torch.no_grad():
                for chunk in self.val_tokens.split(self.cfg.batch.micro_batch_size):
                    chunk = chunk.to(self.world.device)
                    with self._autocast():
                        logits = model(chunk[:, :-1])
                    loss = next_token_loss(logits, chunk[:, 1:], reduction="sum")
                    total[0] += loss.double()
                    total[1] += chunk[:, 1:].numel()
        if self.world.dp_size > 1:
            dist.all_reduce(total, group=self.world.dp_group)
        model.train(was_training)
        return total

    def request_stop(self) -> None:
        """End `fit` cleanly before `schedule.steps`: the steps already queued finish, nothing more is queued, and
        `on_train_end` runs (so the final checkpoint is saved). Elastic resizing stops a run this way to restart
        it at another world size (glassbox.elastic)."""
        self._stop_requested = True

    def fit(self) -> TrainState:
        """Train to `schedule.steps`, calling the callbacks; a resume (in on_train_start) continues from its step."""
        s = self.state
        self.dispatch("on_train_start")
        if s.step > 0:
            rank0_decides(self._check_order_log)
        if self.world.is_main:
            write_run_manifest(self.run_dir, data=self.data_info, device=self.world.device, step=s.step,
                               world_size=self.world.world_size, dp=self.world.dp_size, tp=self.world.tp_size)
        # Step t+1 is queued before step t is finished, so the device never waits for the host to read step t's
        # metrics and run its callbacks, unless a callback needs the live state after step t (a checkpoint).
        pending: QueuedStep | None = None
        while pending is not None or (s.step < self.cfg.schedule.steps and not self._stop_requested):
            if pending is None:
                pending = self.queue_step()
            step = pending.spec.step
            overlaps = (step < self.cfg.schedule.steps and not self._stop_requested
                        and not any(cb.needs_state(step) for cb in self.callbacks))
            following = self.queue_step() if overlaps else None
            self.finish_step(pending)
            self.dispatch("on_step_end")
            pending = following
        self.dispatch("on_train_end")
        if self.order_log is not None:
            self.order_log.fold()
        return s
