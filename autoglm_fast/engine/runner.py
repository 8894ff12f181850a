"""Model runners: turn a step plan into next-token logits, one row per planned request.

FastRunner packs every planned token (prefill chunks and decodes alike) into one [1, N, H] batch on
the paged KV cache and runs the Triton backbone once; decode rows come first, and attention sends
them to the decode kernel and the chunks to the prefill kernel. A step of decodes alone goes to
`decode` instead: the whole step, sampling included, in one CUDA graph (cuda_graphs.py).
ReferenceRunner runs the eager model request by request, each with its own contiguous KVCache:
slow, simple, and the yardstick. Both reach the model only through its family's runtime
(families/runtime.py).
"""
from __future__ import annotations

import torch

from ..families.runtime import FamilyRuntime
from ..paged_cache import PagedKVCache
from ..reference.glm import KVCache, make_caches
from .request import Request


def _rope_batch(rope: torch.Tensor | None) -> torch.Tensor | None:
    """[rows, N] M-RoPE positions -> the decoder's [rows, 1, N]."""
    return None if rope is None else rope[:, None]


class FastRunner:
    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, graphs=None, pieces=None):
        """graphs: DecodeGraphs (whole decode steps) and pieces: PiecewiseGraphs (the others), or None."""
        self.runtime, self.cache, self.graphs, self.pieces = runtime, cache, graphs, pieces

    def can_decode(self, requests: list[Request]) -> bool:
        return self.graphs is not None and len(requests) <= self.graphs.max_batch

    def decode(self, requests: list[Request], plan, below_min: list[bool], generators) -> list[list[float]]:
        """A step of decodes alone (can_decode): packed samples per request (sampling.pack)."""
        self.cache.append([r.request_id for r in requests], [1] * len(requests))
        return self.graphs.run(requests, plan, below_min, generators)

    def run(self, requests: list[Request], num_tokens: list[int]) -> torch.Tensor:
        rt = self.runtime
        meta = self.cache.step([r.request_id for r in requests], num_tokens)
        meta.rope_positions = rt.rope_positions(requests, num_tokens)
        embeds = rt.step_embeds(requests, num_tokens)
        hidden = None if self.pieces is None else self.pieces.run(meta, embeds)
        if hidden is None:
            hidden = rt.backbone(embeds[None], meta.positions[None], self.cache.layer_caches(meta),
                                 rope_positions=_rope_batch(meta.rope_positions))[0]
        last = meta.query_start_loc[1:].long() - 1  # each request's last new token
        return rt.lm_head(hidden[last])

    def release(self, request: Request) -> None:
        pass  # the paged cache's blocks are freed by the scheduler


class ReferenceRunner:
    graphs = None

    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, max_model_len: int):
        self.runtime, self.cache, self.max_model_len = runtime, cache, max_model_len
        self.kv: dict[str, list[KVCache]] = {}

    def can_decode(self, requests: list[Request]) -> bool:
        return False

    def run(self, requests: list[Request], num_tokens: list[int]) -> torch.Tensor:
        self.cache.step([r.request_id for r in requests], num_tokens)  # the same block accounting as fast
        rt, rows = self.runtime, []
        for req, n in zip(requests, num_tokens):
            if req.num_computed == 0:  # new, or recomputing after preemption
                self.kv[req.request_id] = make_caches(rt.text, 1, min(self.max_model_len, req.total_len +
                                                                      req.params.max_tokens), rt.embed_tokens.weight)
            positions = torch.arange(req.num_computed, req.num_computed + n, device=req.prompt_embeds.device)
            hidden = rt.backbone(rt.step_embeds([req], [n])[None], positions[None], self.kv[req.request_id],
                                 rope_positions=_rope_batch(rt.rope_positions([req], [n])))
            rows.append(rt.lm_head(hidden[0, -1]))
        return torch.stack(rows)

    def release(self, request: Request) -> None:
        self.kv.pop(request.request_id, None)
