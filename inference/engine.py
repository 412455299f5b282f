"""The engine: requests in, tokens out, one scheduler step at a time.

`LLMEngine.step()` asks the proposer for drafts, lets the scheduler pick the batch, runs the model, samples
(verifying the drafts), moves the KV of accepted draft paths into place, and applies each sequence's stopping
rules (EOS, stop tokens, stop strings, max_tokens, context length). It is
single-threaded; `glassbox.inference.async_engine` drives it from a thread beside the HTTP server, and
`glassbox.inference.llm.LLM` drives it to completion for offline use.

Extensions (`add_extension`) run inside the step, on the engine's thread: before scheduling and after the
outputs are known, where they may add, fork and abort requests (Dynasor's program controller does all three).
`fork` starts a request from a running sequence's KV (shared blocks, see BlockManager.fork) instead of its text.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from glassbox.config import ConfigError
from glassbox.errors import GlassboxError
from glassbox.inference.block_manager import BlockManager
from glassbox.inference.compile_cache import compile_cache_for
from glassbox.inference.model_runner import ModelRunner, graph_batch_sizes, kv_bytes_per_block
from glassbox.inference.piecewise import piecewise_sizes
from glassbox.inference.policy import POLICIES, make_policy
from glassbox.inference.sampler import Sampler, Verified
from glassbox.inference.sampling_params import MAX_SEED, SamplingParams, SamplingParamsError
from glassbox.inference.scheduler import Scheduler, draft_cap
from glassbox.inference.sequence import Sequence, TokenLogprob
from glassbox.inference.speculative import EMPTY, PROPOSERS, Draft, NoProposer, Proposer
from glassbox.inference.tensor_parallel import (LeaderRunner, TensorParallelGroup, check_shardable, launch,
                                                 shard_model)
from glassbox.inference.tokenizer import IncrementalDetokenizer, Tokenizer
from glassbox.models.transformer import Transformer

# The weight and KV dtypes the engine runs in, by the name EngineConfig.dtype takes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


GRAPH_COMPILE_MODES = ("per_size", "dynamic")


@dataclass
class EngineConfig:
    """Engine settings. `num_kv_blocks` None sizes the KV pool from memory: on CUDA, `gpu_memory_utilization` of
    the card minus what a full-budget forward needs; on CPU, enough for `max_num_seqs` full-length sequences,
    capped at `cpu_kv_cache_gb`. `compile` runs the decoder layer through `torch.compile`: at fixed sizes for the
    CUDA graphs of decoding (about 1.7x faster per decode step on the H100), with dynamic shapes for everything
    else, every batch structure compiled before the first request. It costs start-up time (about 3 minutes on the
    H100 for a 350M model, 35 s on a 2-core CPU for a 7M one), so it is off by default; dense models only.
    `piecewise_graphs` runs the steps the decode graphs do not take (prompts, prompts beside decodes) as graphs
    captured at padded token counts up to `max_num_batched_tokens`, cut at attention, which runs eagerly between
    them (glassbox.inference.piecewise): on the H200, 1.9x the output rate under load of the eager steps. None
    (the default) turns them on where they apply (CUDA with cuda_graphs, dense, one rank); True insists (an
    error where they cannot run; uncaptured on a CPU, which tests use); False turns them off.
    `graph_compile` (with `compile`) is how the decode graphs' layer is compiled: `per_size`, one static
    specialisation per captured batch size (each tuned alone; most of a cold start: 20 sizes at max_num_seqs 256),
    or `dynamic`, one compile with a symbolic batch size that every graph of 2 or more sequences shares, plus batch
    1, which torch specialises (a shorter cold start; bench/serving_perf.py --graph-compile measures both).
    `fuse_projections` joins each layer's Q/K/V weights, and a dense MLP's gate/up weights, into one matrix
    (Transformer.fuse_projections; the model's values are unchanged, its separate projections become views): one
    matrix product a layer instead of three, and one instead of two, which at small batches saves kernels that
    are latency-bound (bench/results/decode_profile_h200.md).
    `max_n` caps the samples one request may ask for (n), so that one request cannot occupy the engine for long.

    Speculative decoding: `proposer` names a registered proposer (`suffix`, or `none`), `spec_options` its own
    settings (for `suffix`, SuffixConfig's fields). Each step a decoding sequence verifies a draft tree of at most
    `num_spec_tokens` nodes, and at most `spec_batch_tokens` nodes share one step (`scheduler.draft_cap`: an
    equal share each, so drafts shrink as the batch grows and vanish past that many sequences); a draft whose
    score (the proposer's estimate of accepted tokens) is below `spec_min_score` is not verified at all.
    Every field is checked when the config is built and again when an engine is built from it."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gb: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"
    policy_options: dict = field(default_factory=dict)
    proposer: str = "none"
    num_spec_tokens: int = 0
    spec_batch_tokens: int = 64
    spec_min_score: float = 1.0
    spec_options: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = True
    piecewise_graphs: bool | None = None
    compile: bool = False
    graph_compile: str = "per_size"
    fuse_projections: bool = True
    compile_cache: bool = True
    compile_cache_dir: str | None = None
    tensor_parallel_size: int = 1
    seed: int = 0
    max_n: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ConfigError naming the first field out of range or of the wrong type."""
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"engine.{name}: must be {expected}, got {getattr(self, name)!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_n", "tensor_parallel_size"):
            if not _is_int(getattr(self, name), 1):
                raise bad(name, "a positive integer")
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name), 1):
                raise bad(name, "a positive integer or None")
        if not _is_int(self.num_spec_tokens, 0):
            raise bad("num_spec_tokens", "an integer >= 0")
        if not _is_int(self.spec_batch_tokens, 1):
            raise bad("spec_batch_tokens", "a positive integer")
        if not _is_real(self.spec_min_score) or self.spec_min_score < 0:
            raise bad("spec_min_score", "a number >= 0")
        if not isinstance(self.policy_options, dict):
            raise bad("policy_options", "a mapping of the policy's settings")
        if not isinstance(self.spec_options, dict):
            raise bad("spec_options", "a mapping of the proposer's settings")
        if self.tensor_parallel_size > 1 and self.compile:
            raise ConfigError("engine.compile: not supported with tensor_parallel_size > 1 (the all-reduces between "
                              "the compiled parts are not captured yet); serve with one of the two")
        if self.tensor_parallel_size > 1 and self.piecewise_graphs is True:
            raise ConfigError("engine.piecewise_graphs: not supported with tensor_parallel_size > 1 (the all-reduces "
                              "between the pieces are not captured yet); serve with one of the two")
        if self.graph_compile not in GRAPH_COMPILE_MODES:
            raise bad("graph_compile", " or ".join(GRAPH_COMPILE_MODES))
        if self.compile_cache_dir is not None and not isinstance(self.compile_cache_dir, str):
            raise bad("compile_cache_dir", "a directory path or None (the default location)")
        if not _is_int(self.seed, 0, MAX_SEED):
            raise bad("seed", f"an integer in [0, {MAX_SEED}]")
        if not _is_real(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "a fraction in (0, 1]")
        if not _is_real(self.cpu_kv_cache_gb) or self.cpu_kv_cache_gb <= 0:
            raise bad("cpu_kv_cache_gb", "a positive number")
        if self.piecewise_graphs is not None and not isinstance(self.piecewise_graphs, bool):
            raise bad("piecewise_graphs", "true, false or None (on where they apply)")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "cuda_graphs", "compile", "compile_cache",
                     "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name, known in (("policy", POLICIES), ("proposer", PROPOSERS), ("dtype", DTYPES)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in known:
                raise bad(name, f"one of {', '.join(known)}")
        if self.proposer != "none" and self.num_spec_tokens == 0:
            raise ConfigError(f"engine.num_spec_tokens: proposer {self.proposer!r} needs num_spec_tokens >= 1 "
                              "(the most draft nodes a sequence verifies per step), got 0")
        if self.spec_options and self.proposer == "none":
            raise ConfigError("engine.spec_options: given without a proposer (set engine.proposer)")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise bad("device", "a torch device such as cpu, cuda or cuda:1") from None

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise GlassboxError(f"engine dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


def _is_int(value: object, lo: int, hi: int | None = None) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
            and (hi is None or value <= hi))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def build_proposer(cfg: EngineConfig) -> Proposer:
    """The proposer `cfg.proposer` names, built from `cfg.spec_options`. For `suffix` those are SuffixConfig's
    fields; its max_spec_tokens is num_spec_tokens unless given, so that one knob sizes the drafts."""
    if cfg.proposer == "none":
        return NoProposer()
    if cfg.proposer == "suffix":
        from glassbox.inference.speculative.suffix import SuffixConfig, SuffixProposer

        return SuffixProposer(SuffixConfig.from_dict({"max_spec_tokens": cfg.num_spec_tokens, **cfg.spec_options}))
    return PROPOSERS[cfg.proposer](**cfg.spec_options)


def within_depth(draft: Draft, depth: int) -> Draft:
    """The nodes of `draft` at most `depth` deep (a node's ancestors are shallower, so it stays a tree)."""
    if draft.max_depth <= depth:
        return draft
    keep = [i for i, d in enumerate(draft.depths) if d <= depth]
    index = {old: new for new, old in enumerate(keep)}
    return Draft(tuple(draft.tokens[i] for i in keep), tuple(index.get(draft.parents[i], -1) for i in keep),
                 draft.score)


class SpecCounters:
    """Totals of speculative verification, for stats() and /metrics: drafts verified, their nodes, and the nodes
    accepted (acceptance rate = accepted / nodes; mean accepted length = accepted / drafts)."""

    def __init__(self) -> None:
        self.drafts = 0
        self.draft_tokens = 0
        self.accepted_tokens = 0

    def record(self, nodes: int, accepted: int) -> None:
        self.drafts += 1
        self.draft_tokens += nodes
        self.accepted_tokens += accepted

    def stats(self) -> dict[str, float]:
        return {"spec_drafts": self.drafts, "spec_draft_tokens": self.draft_tokens,
                "spec_accepted_tokens": self.accepted_tokens}


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None


@dataclass
class RequestOutput:
    """A request's outputs so far. `error` is what made the engine fail the request (its unfinished outputs then
    finish with reason "error"); None for every request served to its end or aborted."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None

    def latency(self) -> tuple[float | None, float | None]:
        """Time to first token (from arrival) and mean time per output token after the first (over the longest
        output), in seconds; None where there are too few tokens to tell."""
        m = self.metrics
        if "first_token_time" not in m:
            return None, None
        ttft = m["first_token_time"] - m["arrival_time"]
        longest = max(len(o.token_ids) for o in self.outputs)
        tpot = (m["last_token_time"] - m["first_token_time"]) / (longest - 1) if longest > 1 else None
        return ttft, tpot


class _Request:
    """A prompt and its n sequences, with their decoded text and stop-string state."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seqs: list[Sequence],
                 tokenizer: Tokenizer | None):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.seqs = seqs
        self.detok = [IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer else None for _ in seqs]
        self.texts = ["" for _ in seqs]
        # The longest stop string, less one character, is the most text that could be an unfinished stop string.
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def visible_text(self, i: int) -> str:
        """Text safe to show: while running, hold back what could be the start of a stop string."""
        text = self.texts[i]
        if self.seqs[i].finished or self.hold == 0:
            return text
        return text[:max(0, len(text) - self.hold)]

    def output(self) -> RequestOutput:
        outs = []
        for i, seq in enumerate(self.seqs):
            lps = seq.logprobs[:seq.num_output_tokens] if seq.params.logprobs is not None else None
            outs.append(CompletionOutput(i, seq.output_ids, self.visible_text(i), seq.finish_reason, lps))
        metrics = {"arrival_time": self.seqs[0].arrival_time}
        firsts = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        if firsts:
            metrics["first_token_time"] = min(firsts)
        lasts = [s.last_token_time for s in self.seqs if s.last_token_time is not None]
        if lasts:
            metrics["last_token_time"] = max(lasts)
        cached = max(s.num_cached_tokens for s in self.seqs)
        return RequestOutput(self.request_id, self.prompt_ids, outs, self.finished, cached, metrics)


class EngineExtension(Protocol):
    """Something that steers requests from inside the engine's step (Dynasor's program controller)."""

    def before_step(self, engine: "LLMEngine") -> None:
        """Before scheduling: apply what arrived since the last step (new programs, stops)."""
        ...

    def after_step(self, engine: "LLMEngine", outputs: list[RequestOutput]) -> list[RequestOutput]:
        """After sampling, given the step's outputs (unfinished ones included): act on them, and return the
        outputs to hand on to the caller."""
        ...

    def has_work(self) -> bool:
        """Whether the extension needs steps even while the engine holds no request (work still queued)."""
        ...


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 eos_token_ids: list[int] | None = None, proposer: Proposer | None = None,
                 tensor_parallel: TensorParallelGroup | None = None):
        """`tensor_parallel`: this rank's group when the model is a shard (LLMEngine.from_model_dir builds it
        for engine.tensor_parallel_size > 1); rank 0 then drives the other ranks' model runners."""
        self.config = config or EngineConfig()
        self.tp = tensor_parallel
        cfg = self.config
        cfg.validate()
        self.model = model
        if cfg.fuse_projections:
            model.fuse_projections()
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids or [])
        self.max_model_len = min(cfg.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < self.max_model_len:
            # Unchunked, a sequence must fit in one step's budget, or it (and every request behind it) would wait
            # forever; that includes a sequence recomputed after preemption, up to the full context.
            raise ConfigError(
                f"engine.max_num_batched_tokens: {cfg.max_num_batched_tokens} is below the context of "
                f"{self.max_model_len} tokens, which without chunked prefill must fit in one step: raise it, lower "
                "max_model_len, or enable chunked prefill"
            )
        num_blocks = cfg.num_kv_blocks or self._auto_num_blocks()
        if self.tp is not None:
            num_blocks = self.tp.agree_min(num_blocks)            # the pool every rank's memory can hold
        if num_blocks * cfg.block_size < self.max_model_len:
            raise GlassboxError(
                f"KV cache of {num_blocks} blocks x {cfg.block_size} tokens cannot hold one {self.max_model_len}-token "
                "sequence: raise num_kv_blocks / memory, or lower max_model_len"
            )
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, make_policy(cfg.policy, cfg.policy_options, tokenizer),
                                   cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enable_chunked_prefill)
        self.proposer = proposer or build_proposer(cfg)
        self.speculating = cfg.num_spec_tokens > 0 and not isinstance(self.proposer, NoProposer)
        with compile_cache_for(cfg, model, num_blocks, self.max_model_len) as self.startup:
            # CUDA graphs stay off under tensor parallelism until capturing the all-reduces is measured.
            self.runner = ModelRunner(model, num_blocks, cfg.block_size, self.max_model_len, cfg.max_num_seqs,
                                      cfg.cuda_graphs and self.tp is None, cfg.compile, self._verification_rows(),
                                      piecewise=self._piecewise_sizes(), graph_compile=cfg.graph_compile)
        if self.tp is not None and self.tp.rank == 0:
            self.runner = LeaderRunner(self.runner, self.tp)
        self.sampler = Sampler(cfg.seed)
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        self.num_failed_requests = 0
        self.spec = SpecCounters()
        self.extensions: list[EngineExtension] = []

    def _piecewise_sizes(self) -> list[int] | None:
        """The token counts of the piecewise graphs, or None without them (see EngineConfig.piecewise_graphs)."""
        cfg = self.config
        wanted = cfg.piecewise_graphs
        if wanted is None:
            wanted = (torch.device(cfg.device).type == "cuda" and cfg.cuda_graphs and self.tp is None
                      and not self.model.config.is_moe)
        return piecewise_sizes(cfg.max_num_batched_tokens) if wanted else None

    def _verification_rows(self) -> dict[int, int]:
        """Rows per sequence of the verification graph at each decode-graph size: the last token plus the most
        draft nodes `draft_cap` gives the smallest batch that size takes."""
        if not self.speculating:
            return {}
        cfg = self.config
        rows, prev = {}, 0
        for b in graph_batch_sizes(cfg.max_num_seqs):
            cap = draft_cap(prev + 1, cfg.num_spec_tokens, cfg.spec_batch_tokens)
            if cap > 0:
                rows[b] = 1 + cap
            prev = b
        return rows

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, config: EngineConfig | None = None,
                       proposer: Proposer | None = None) -> "LLMEngine":
        from glassbox.inference.loader import load_model_dir

        config = config or EngineConfig()
        config.validate()
        model, tokenizer, eos = load_model_dir(Path(model_dir), config.torch_dtype(), config.device)
        group = None
        if config.tensor_parallel_size > 1:
            check_shardable(model, config.tensor_parallel_size)      # before any worker starts
            group = launch(Path(model_dir), config)
            shard_model(model, 0, group.world)
        return cls(model, tokenizer, config, eos, proposer, tensor_parallel=group)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (an engine of one process holds nothing to stop)."""
        if self.tp is not None:
            self.tp.shutdown()
            self.tp = None

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        p = next(self.model.parameters())
        per_block = kv_bytes_per_block(self.model, cfg.block_size, p.dtype)
        if p.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                ids = torch.zeros(1, min(cfg.max_num_batched_tokens, self.model.config.max_seq_len),
                                  dtype=torch.long, device=p.device)
                self.model(ids)
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            peak = torch.cuda.max_memory_allocated()
            used_by_others = total - free - torch.cuda.memory_reserved()
            budget = cfg.gpu_memory_utilization * total - peak - used_by_others
            torch.cuda.empty_cache()
            return max(int(budget // per_block), 1)
        want = cfg.max_num_seqs * -(-self.max_model_len // cfg.block_size)
        return max(1, min(want, int(cfg.cpu_kv_cache_gb * 1024**3 // per_block)))

    # Requests ------------------------------------------------------------------------------------------------

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams, priority: float = 0.0) -> None:
        """Raise GlassboxError if the engine cannot serve this prompt with these settings (a SamplingParamsError,
        naming the field, for sampling values; the params are checked again in case they changed since built)."""
        params.validate()
        if params.n > self.config.max_n:
            raise SamplingParamsError("n", f"must be at most {self.config.max_n} (this engine's max_n), got {params.n}")
        vocab = self.model.config.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise SamplingParamsError("logprobs", f"must be at most the vocabulary size {vocab}, got {params.logprobs}")
        if not _is_real(priority):
            raise GlassboxError(f"priority must be a finite number, got {priority!r}")
        if not prompt_ids:
            raise GlassboxError("the prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise GlassboxError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) >= self.max_model_len:
            raise GlassboxError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} "
                "(the prompt must leave room for at least one generated token)"
            )
        if params.max_tokens is not None and len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise GlassboxError(
                f"max_tokens {params.max_tokens} + prompt {len(prompt_ids)} tokens exceeds the model's context of "
                f"{self.max_model_len} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise GlassboxError("stop strings need a tokenizer: the model directory has no tokenizer.json")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: float = 0.0, group: str | None = None) -> None:
        """Queue a request; `priority` orders it under the priority policy (lower first); its sequences join
        `group` (a program id the scheduler admits and preempts together), when given."""
        if request_id in self.requests:
            raise GlassboxError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_ids, params, priority)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(request_id, list(prompt_ids), params, index=i, arrival_time=arrival, priority=priority,
                         group=group) for i in range(params.n)]
        self.scheduler.add_all(seqs)
        self.requests[request_id] = _Request(request_id, list(prompt_ids), params, seqs, self.tokenizer)

    def fork(self, parent_request_id: str, request_id: str, extra_ids: list[int], params: SamplingParams,
             index: int = 0) -> bool:
        """Start request `request_id` from sample `index` of running request `parent_request_id`: its prompt is
        the parent's tokens so far plus `extra_ids` (a probe's answer cue), and the parent's KV is shared, not
        recomputed: full blocks by reference, the partly filled last block copied (at most block_size - 1 tokens of
        KV), so the new request computes only the parent's last sampled token and `extra_ids`. Returns False,
        adding nothing, when the parent is not running with KV (waiting, preempted, finished) or no block is free
        for the copy; a caller retries later. The new request is independent of the parent from then on."""
        if request_id in self.requests:
            raise GlassboxError(f"request id {request_id!r} is already in use")
        req = self.requests.get(parent_request_id)
        if req is None or not 0 <= index < len(req.seqs):
            raise GlassboxError(f"fork: no sample {index} of a request {parent_request_id!r} in the engine")
        parent = req.seqs[index]
        if parent.finished or parent not in self.scheduler.running or parent.num_computed_tokens == 0:
            return False
        prompt = parent.token_ids + list(extra_ids)
        self.validate_prompt(prompt, params, parent.priority)
        child = Sequence(request_id, prompt, params, arrival_time=time.monotonic(), priority=parent.priority)
        pairs = self.blocks.fork(parent, child)
        if pairs is None:
            return False
        self.runner.move_kv([src for src, _ in pairs], [dst for _, dst in pairs])
        self.requests[request_id] = _Request(request_id, prompt, params, [child], self.tokenizer)
        self.scheduler.add(child)
        return True

    def add_extension(self, extension: EngineExtension) -> None:
        """Run `extension`'s hooks in every step from now on (in the order added)."""
        self.extensions.append(extension)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, freeing its KV blocks; returns its final output (None if unknown)."""
        return self._stop(request_id, "abort")

    def fail(self, request_id: str, error: Exception) -> RequestOutput | None:
        """Stop a request because serving it raised `error`: its unfinished sequences finish with reason "error",
        their KV blocks are freed, and the output carries the error (None if the engine never added the request).
        Either way it counts in stats()["num_failed_requests"]."""
        self.num_failed_requests += 1
        out = self._stop(request_id, "error")
        if out is not None:
            out.error = error
        return out

    def _stop(self, request_id: str, reason: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, reason)
                self.proposer.on_finished(seq)
        return req.output()

    def has_unfinished(self) -> bool:
        return bool(self.requests) or any(ext.has_work() for ext in self.extensions)

    # Stepping ------------------------------------------------------------------------------------------------

    def _propose(self) -> None:
        """Give each decoding sequence its draft for this step, or none: none past `draft_cap`, none whose score
        is below `spec_min_score`, and never one that could run past max_tokens or the context (the model's own
        token needs room too)."""
        if not self.speculating:
            return
        cfg = self.config
        decoding = [s for s in self.scheduler.running if not s.is_prefilling]
        cap = draft_cap(len(decoding), cfg.num_spec_tokens, cfg.spec_batch_tokens)
        if not decoding:
            return
        if cap <= 0:
            for seq in decoding:
                seq.set_draft(EMPTY)
            return
        drafts = self.proposer.propose(decoding, cap)
        if len(drafts) != len(decoding):
            raise GlassboxError(f"proposer {self.proposer.name!r} returned {len(drafts)} drafts for "
                                f"{len(decoding)} sequences")
        vocab = self.model.config.vocab_size
        for seq, draft in zip(decoding, drafts):
            if not isinstance(draft, Draft):
                raise GlassboxError(f"proposer {self.proposer.name!r} returned {type(draft).__name__}, not a Draft")
            # Node slots follow the last token's, so the context bounds the node count; max_tokens bounds the
            # depth (an accepted path of d nodes emits d + 1 tokens).
            draft = draft.truncated(min(cap, self.max_model_len - seq.num_tokens - 1))
            if seq.params.max_tokens is not None:
                draft = within_depth(draft, seq.params.max_tokens - seq.num_output_tokens - 1)
            if not draft or draft.score < cfg.spec_min_score:
                seq.set_draft(EMPTY)
                continue
            if not all(0 <= t < vocab for t in draft.tokens):
                raise GlassboxError(f"proposer {self.proposer.name!r} drafted a token outside the vocabulary "
                                    f"(0..{vocab - 1})")
            seq.set_draft(draft)

    def step(self, unfinished_outputs: bool = True) -> list[RequestOutput]:
        """Run one batch. Returns an output for every request that got tokens (for streaming), or with
        `unfinished_outputs` False only for the requests that finished (offline use: cheaper). A request whose
        sampling or stop checks raise is failed alone (`fail`), its output among those returned. Extensions see
        every output (see EngineExtension) and choose what is returned."""
        for ext in self.extensions:
            ext.before_step(self)
        outputs = self._step(unfinished_outputs or bool(self.extensions))
        for ext in self.extensions:
            outputs = ext.after_step(self, outputs)
        if not unfinished_outputs:
            outputs = [out for out in outputs if out.finished]
        return outputs

    def _step(self, unfinished_outputs: bool) -> list[RequestOutput]:
        self._propose()
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        logits = self.runner.execute(batch, self.blocks)
        self.num_steps += 1
        rows: list[tuple[Sequence, Draft]] = []
        for s in batch.scheduled:
            if s.samples:
                rows.append((s.seq, s.draft))
            else:                                       # a prefill chunk short of the prompt's end
                s.seq.computed(s.num_tokens)
                self.blocks.commit(s.seq)
        if not rows:
            return []
        results = self.sampler.logprobs(logits, rows, self.sampler.sample(logits, rows))
        self._place_accepted_kv(rows, results)
        touched, failed = self._append_tokens(rows, results)
        outputs = [self.fail(request_id, error) for request_id, error in failed.items()]
        for req in touched.values():
            if req.finished:
                outputs.append(req.output())
                del self.requests[req.request_id]
            elif unfinished_outputs:
                outputs.append(req.output())
        return outputs

    def _place_accepted_kv(self, rows: list[tuple[Sequence, Draft]], results: list[Verified | Exception]) -> None:
        """Node i of a draft wrote its KV at the slot after the last token's plus i; accepted at depth d, it
        belongs at the last token's position plus d. Move the nodes that are not there yet (a linear draft's
        never move), in one copy per layer for the whole batch; the rest of the tree is left behind the computed
        count, where the next step overwrites it."""
        src: list[int] = []
        dst: list[int] = []
        for (seq, draft), verified in zip(rows, results):
            if isinstance(verified, Exception) or not draft:
                continue
            self.spec.record(len(draft), len(verified.path))
            last = seq.num_tokens - 1
            for depth, node in enumerate(verified.path, start=1):
                if node + 1 != depth:
                    src.append(self.blocks.slot(seq, last + 1 + node))
                    dst.append(self.blocks.slot(seq, last + depth))
        self.runner.move_kv(src, dst)

    def _append_tokens(self, rows: list[tuple[Sequence, Draft]], results: list[Verified | Exception]
                       ) -> tuple[dict[str, _Request], dict[str, Exception]]:
        """Give each sampled sequence its accepted tokens, stopping it where a rule says so. Returns the requests
        that got tokens, and those to fail with their error: an entry the sampler could not sample, or one whose
        stop checks raised, fails its whole request."""
        now = time.monotonic()
        touched: dict[str, _Request] = {}
        failed: dict[str, Exception] = {}
        for (seq, _), verified in zip(rows, results):
            request_id = seq.request_id
            if request_id in failed:
                continue
            if not isinstance(verified, Exception):
                try:
                    touched[request_id] = self._append(seq, verified.tokens, now)
                    continue
                except Exception as e:
                    verified = e
            failed[request_id] = verified
            touched.pop(request_id, None)
        return touched, failed

    def _append(self, seq: Sequence, accepted: list[int], now: float) -> _Request:
        req = self.requests[seq.request_id]
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        reason = None
        for i, tok in enumerate(accepted):
            reason = self._check_stop(req, seq, tok, seq.num_tokens + i + 1)
            if reason is not None:
                accepted = accepted[:i + 1]
                break
        seq.verified(accepted)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.proposer.on_finished(seq)
        else:
            self.blocks.trim(seq)
            self.blocks.commit(seq)
        return req

    def _check_stop(self, req: _Request, seq: Sequence, tok: int, num_tokens: int) -> str | None:
        """Whether `seq` stops at `tok`, its token number `num_tokens` (prompt included)."""
        p = seq.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        i = seq.index
        if req.detok[i] is not None:
            before = len(req.texts[i])
            req.texts[i] += req.detok[i].add(tok)
            if p.stop:
                text = req.texts[i]
                start = max(0, before - req.hold)
                hits = [j for j in (text.find(s, start) for s in p.stop) if j >= 0]
                if hits:
                    req.texts[i] = text[:min(hits)]
                    return "stop"
        if p.max_tokens is not None and num_tokens - seq.prompt_len >= p.max_tokens:
            return "length"
        if num_tokens >= self.max_model_len:
            return "length"
        return None

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.blocks.num_used_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.blocks.prefix_hits,
            "prefix_cache_query_tokens": self.blocks.prefix_queries,
            "num_forks": self.blocks.num_forks,
            "fork_shared_blocks": self.blocks.fork_shared_blocks,
            "fork_copied_tokens": self.blocks.fork_copied_tokens,
            "num_failed_requests": self.num_failed_requests,
            **self.scheduler.policy.stats(),
            **self.spec.stats(),
            **{f"spec_{k}": v for k, v in (self.proposer.stats() if hasattr(self.proposer, "stats") else {}).items()},
        }
