"""Server metrics in Prometheus text format: request counts, token counts, latency histograms, queue and KV gauges.

Written by hand (a few counters and histograms) rather than pulling in a client library.
"""

from __future__ import annotations

import bisect
import threading

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
)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for le, c in zip(self.buckets, self.counts):
            cumulative += c
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum}")
        lines.append(f"{name}_count {self.count}")
        return lines


class ServerMetrics:
    """Updated by the engine thread, read by the HTTP handlers; a lock keeps a scrape consistent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.engine: dict[str, float] = {}

    def request_finished(self, finish_reasons: list[str], prompt_tokens: int, generation_tokens: int,
                         ttft: float | None, tpot: float | None) -> None:
        with self.lock:
            for reason in finish_reasons:
                self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)

    def update_engine(self, stats: dict[str, float]) -> None:
        with self.lock:
            self.engine = dict(stats)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP glassbox_requests_total Finished sequences by finish reason.",
                     "# TYPE glassbox_requests_total counter"]
            for reason, n in sorted(self.requests.items()):
                lines.append(f'glassbox_requests_total{{finish_reason="{reason}"}} {n}')
            lines += ["# HELP glassbox_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE glassbox_prompt_tokens_total counter",
                      f"glassbox_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP glassbox_generation_tokens_total Generated tokens of finished requests.",
                      "# TYPE glassbox_generation_tokens_total counter",
                      f"glassbox_generation_tokens_total {self.generation_tokens}"]
            lines += self.ttft.render("glassbox_time_to_first_token_seconds", "Arrival to first generated token.")
            lines += self.tpot.render("glassbox_time_per_output_token_seconds",
                                      "Mean time between generated tokens after the first, per request.")
            for name, kind, help_text, key in ENGINE_METRICS:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {self.engine.get(key, 0)}"]
            return "\n".join(lines) + "\n"
