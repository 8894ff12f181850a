"""Prefix caching seen from the API: `usage.prompt_tokens_details.cached_tokens` (OpenAI's and vLLM's field)
and the hit rate on /metrics, on the fast backend."""
import json

import torch

from kernel_harness import requires_kernels
from live_server import SCHED, Live, httpx, post  # noqa: F401 (skips without the server's packages)
from autoglm_fast.engine import Engine

SYSTEM = "You are a phone agent. Look at the screen, think, then answer with one action. " * 2


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@requires_kernels
def test_cached_tokens_in_usage_and_the_hit_rate_on_metrics(request):
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED, block_size=8)
    live = Live(engine)
    request.addfinalizer(live.close)

    def ask(question, stream=False):
        body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                "max_tokens": 2, "temperature": 0, "stream": stream}
        if not stream:
            return post(live, body).json()["usage"]
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        return json.loads(lines[-1][len("data: "):])["usage"]

    first, second = ask("open settings"), ask("open the camera", stream=True)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached % 8 == 0 and len(SYSTEM) - 8 <= cached < second["prompt_tokens"]  # the system prompt's blocks
    text = httpx.get(live.url + "/metrics").text
    queries, hits = _metric(text, "autoglm_prefix_cache_queries_total"), _metric(text, "autoglm_prefix_cache_hits_total")
    assert queries == first["prompt_tokens"] + second["prompt_tokens"] and hits == cached
    assert abs(_metric(text, "autoglm_prefix_cache_hit_rate") - hits / queries) < 1e-5
