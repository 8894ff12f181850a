"""A few Prometheus metrics, written in the text exposition format by hand (no client library)."""
from __future__ import annotations

from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}",
                      f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.requests = Counter()          # by outcome: stop / length / abort / error / rejected
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def render(self, engine, in_flight: int) -> str:
        cache = engine.cache
        lines = ["# HELP autoglm_requests_total Finished chat requests by outcome.",
                 "# TYPE autoglm_requests_total counter"]
        lines += [f'autoglm_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        lines += ["# TYPE autoglm_prompt_tokens_total counter", f"autoglm_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE autoglm_generated_tokens_total counter",
                  f"autoglm_generated_tokens_total {self.generated_tokens}",
                  "# TYPE autoglm_requests_in_flight gauge", f"autoglm_requests_in_flight {in_flight}",
                  "# TYPE autoglm_queue_depth gauge", f"autoglm_queue_depth {len(engine.scheduler.waiting)}",
                  "# TYPE autoglm_running_requests gauge", f"autoglm_running_requests {len(engine.scheduler.running)}",
                  "# TYPE autoglm_kv_free_blocks gauge", f"autoglm_kv_free_blocks {engine.cache.num_free_blocks}",
                  "# TYPE autoglm_kv_cached_blocks gauge", f"autoglm_kv_cached_blocks {engine.cache.num_cached_blocks}",
                  "# HELP autoglm_prefix_cache_queries_total Prompt tokens looked up in the prefix cache.",
                  "# TYPE autoglm_prefix_cache_queries_total counter",
                  f"autoglm_prefix_cache_queries_total {cache.prefix_queries}",
                  "# HELP autoglm_prefix_cache_hits_total Prompt tokens found there (not prefilled).",
                  "# TYPE autoglm_prefix_cache_hits_total counter", f"autoglm_prefix_cache_hits_total {cache.prefix_hits}",
                  "# HELP autoglm_prefix_cache_hit_rate Hits over queries since the start (0 before any).",
                  "# TYPE autoglm_prefix_cache_hit_rate gauge",
                  f"autoglm_prefix_cache_hit_rate {cache.prefix_hits / max(1, cache.prefix_queries):.6g}",
                  "# HELP autoglm_time_to_first_token_seconds Arrival to first generated token.",
                  "# TYPE autoglm_time_to_first_token_seconds histogram"]
        lines += self.ttft.lines("autoglm_time_to_first_token_seconds")
        lines += ["# HELP autoglm_time_per_output_token_seconds Mean gap between later tokens, per request.",
                  "# TYPE autoglm_time_per_output_token_seconds histogram"]
        lines += self.tpot.lines("autoglm_time_per_output_token_seconds")
        return "\n".join(lines) + "\n"
