"""Server metrics for Prometheus (through `prometheus_client`, as vLLM does): request and token counters, latency
histograms, HTTP errors by status, and the engine's queue and KV gauges.

Each `ServerMetrics` has its own registry, so several servers in one process (tests, the demo) keep apart.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The engine's stats() as Prometheus series: (name, type, help, stats key).
ENGINE_METRICS = (
    ("glassbox_num_requests_running", "gauge", "Sequences in the running batch.", "num_running"),
    ("glassbox_num_requests_waiting", "gauge", "Sequences queued for admission (queue depth).", "num_waiting"),
    ("glassbox_kv_cache_blocks_used", "gauge", "KV cache blocks held by sequences.", "kv_blocks_used"),
    ("glassbox_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.", "kv_blocks_total"),
    ("glassbox_num_preemptions_total", "counter", "Sequences preempted for recompute.", "num_preemptions"),
    ("glassbox_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
     "prefix_cache_hit_tokens"),
    ("glassbox_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_query_tokens"),
    # Scheduling policy: starvation-guard promotions; the LTR ranker's scored prompts and its cost per request.
    ("glassbox_policy_promotions_total", "counter", "Sequences promoted by the starvation guard.",
     "policy_promotions"),
    ("glassbox_ltr_scored_total", "counter", "Prompts scored by the LTR ranker.", "ltr_scored"),
    ("glassbox_ltr_score_ms_per_request", "gauge", "Mean LTR ranker time per scored request, in ms.",
     "ltr_score_ms_per_request"),
    # Speculative decoding: acceptance rate = accepted / draft tokens; mean accepted length = accepted / drafts.
    ("glassbox_spec_drafts_total", "counter", "Speculative drafts verified.", "spec_drafts"),
    ("glassbox_spec_draft_tokens_total", "counter", "Draft tree nodes verified.", "spec_draft_tokens"),
    ("glassbox_spec_accepted_tokens_total", "counter", "Draft tokens accepted by verification.",
     "spec_accepted_tokens"),
    ("glassbox_spec_cached_requests", "gauge", "Finished outputs held by the suffix proposer's global tree.",
     "spec_cached_requests"),
    ("glassbox_spec_tree_nodes", "gauge", "Nodes of the suffix proposer's global tree.", "spec_tree_nodes"),
    ("glassbox_spec_tree_bytes", "gauge", "Memory of the suffix proposer's global tree, in bytes.",
     "spec_tree_bytes"),
)
FAMILIES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


class _EngineCollector:
    """Exposes the latest engine stats snapshot; the engine's counters are totals it keeps itself."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.engine
        for name, kind, help_text, key in ENGINE_METRICS:
            yield FAMILIES[kind](name, help_text, value=stats.get(key, 0))


class ServerMetrics:
    """Updated by the engine thread and the HTTP handlers, read by scrapes; a lock keeps a scrape consistent (a
    finished request's counters and histograms move together)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("glassbox_requests", "Finished sequences by finish reason.", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("glassbox_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("glassbox_generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("glassbox_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("glassbox_time_per_output_token_seconds",
                              "Mean time between generated tokens after the first, per request.", buckets=TPOT_BUCKETS,
                              registry=r)
        self.errors = Counter("glassbox_request_errors",
                              "HTTP requests answered with an error, by status (499: the client left first; 503: "
                              "over the connection limit or the engine down; 408: the request did not arrive in "
                              "time), and streams ended by an error event (500).", ["status"], registry=r)
        self.engine: dict[str, float] = {}
        r.register(_EngineCollector(self))

    def request_finished(self, finish_reasons: list[str], prompt_tokens: int, generation_tokens: int,
                         ttft: float | None, tpot: float | None) -> None:
        with self.lock:
            for reason in finish_reasons:
                self.requests.labels(reason).inc()
            self.prompt_tokens.inc(prompt_tokens)
            self.generation_tokens.inc(generation_tokens)
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)

    def request_error(self, status: int) -> None:
        with self.lock:
            self.errors.labels(str(status)).inc()

    def update_engine(self, stats: dict[str, float]) -> None:
        with self.lock:
            self.engine = dict(stats)

    def render(self) -> str:
        with self.lock:
            return generate_latest(self.registry).decode()
