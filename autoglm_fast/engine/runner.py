"""Model runners: turn a step plan into next-token logits, one row per planned request.

FastRunner packs every planned token (prefill chunks and decodes alike) into one [1, N, H] batch on
the paged KV cache and runs the Triton backbone once. ReferenceRunner runs the eager model request
by request, each with its own contiguous KVCache: slow, simple, and the yardstick.
"""
from __future__ import annotations

import torch

from ..paged_cache import PagedKVCache
from ..reference.glm import KVCache
from ..reference.model import AutoGLMPhoneForCausalLM, ModalContext
from .request import Request


def chunk_embeds(model: AutoGLMPhoneForCausalLM, req: Request, n: int) -> torch.Tensor:
    """Embeddings [n, H] of the request's next n uncached tokens: prompt rows were spliced and fused at
    admission; generated tokens are embedded now and fused with the request's media summaries."""
    lo, hi, T = req.num_computed, req.num_computed + n, len(req.prompt_ids)
    parts = []
    if lo < T:
        parts.append(req.prompt_embeds[lo:min(hi, T)])
    if hi > T:
        ids = torch.tensor([req.output_ids[max(lo, T) - T:hi - T]], device=req.prompt_embeds.device)
        parts.append(model.embed(ids, context=req.context)[0][0])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def step_embeds(model: AutoGLMPhoneForCausalLM, requests: list[Request], num_tokens: list[int]) -> torch.Tensor:
    """All of a step's token embeddings, sequence after sequence. Decode rows (one generated token
    each) are embedded and fused in a single call, with the requests' media summaries stacked."""
    parts: list[torch.Tensor | None] = [None] * len(requests)
    decode = [i for i, (r, n) in enumerate(zip(requests, num_tokens)) if n == 1 and r.num_computed >= len(r.prompt_ids)]
    if decode:
        rows = [requests[i] for i in decode]
        ids = torch.tensor([[r.output_ids[r.num_computed - len(r.prompt_ids)]] for r in rows],
                           device=rows[0].prompt_embeds.device)
        ctx = ModalContext(*(torch.cat([getattr(r.context, f) for r in rows])
                             for f in ("vision", "audio", "has_vision", "has_audio")))
        embeds = model.embed(ids, context=ctx)[0][:, 0]
        for j, i in enumerate(decode):
            parts[i] = embeds[j:j + 1]
    for i, (r, n) in enumerate(zip(requests, num_tokens)):
        if parts[i] is None:
            parts[i] = chunk_embeds(model, r, n)
    return torch.cat(parts)


class FastRunner:
    def __init__(self, model: AutoGLMPhoneForCausalLM, cache: PagedKVCache, graphs=None):
        self.model, self.cache, self.graphs = model, cache, graphs  # graphs: DecodeGraphs or None

    def run(self, requests: list[Request], num_tokens: list[int]) -> torch.Tensor:
        meta = self.cache.step([r.request_id for r in requests], num_tokens)
        embeds = step_embeds(self.model, requests, num_tokens)[None]
        if self.graphs is not None and meta.is_decode and meta.num_seqs <= self.graphs.max_batch:
            return self.model.lm_head(self.graphs.run(meta, embeds[0]))
        hidden = self.model.model(embeds, meta.positions[None], self.cache.layer_caches(meta))
        last = meta.query_start_loc[1:].long() - 1  # each request's last new token
        return self.model.lm_head(hidden[0, last])

    def release(self, request: Request) -> None:
        pass  # the paged cache's blocks are freed by the scheduler


class ReferenceRunner:
    def __init__(self, model: AutoGLMPhoneForCausalLM, cache: PagedKVCache, max_model_len: int):
        self.model, self.cache, self.max_model_len = model, cache, max_model_len
        self.kv: dict[str, list[KVCache]] = {}

    def run(self, requests: list[Request], num_tokens: list[int]) -> torch.Tensor:
        self.cache.step([r.request_id for r in requests], num_tokens)  # the same block accounting as fast
        rows = []
        for req, n in zip(requests, num_tokens):
            if req.num_computed == 0:  # new, or recomputing after preemption
                self.kv[req.request_id] = self.model.setup_caches(1, min(self.max_model_len, req.total_len +
                                                                          req.params.max_tokens))
            positions = torch.arange(req.num_computed, req.num_computed + n, device=req.prompt_embeds.device)
            hidden = self.model.model(chunk_embeds(self.model, req, n)[None], positions[None],
                                      self.kv[req.request_id])
            rows.append(self.model.lm_head(hidden[0, -1]))
        return torch.stack(rows)

    def release(self, request: Request) -> None:
        self.kv.pop(request.request_id, None)

