"""Decode steps from captured CUDA graphs, at bucketed batch sizes (the gpt-fast / vLLM practice).

A decode step's backbone forward reads only static buffers: token embeddings, positions (and the
M-RoPE rows, for GLM-4.1V), cache slots, block tables and context lengths, padded to the bucket. Padded rows point at a reserved
"null" page (they write their K/V there and attend to it alone), so they never touch a real
sequence. The split-K decode kernel is launched for `max_model_len`, so its grid does not change
from step to step; splits past a sequence's end exit at once. Everything that needs the host
(embedding with media summaries, the cache's block bookkeeping) happens before the replay.

Without CUDA (tests), the same static-buffer path runs eagerly: what the graphs would replay.

What happened is observable (`DecodeGraphs.state`, `Engine.graph_state`): "captured" once decode steps
replay graphs, "fallback" after a capture failed (a warning, eager decoding from then on, the reason
kept), "pending" before the first decode step, "off" without capture (no CUDA, or not requested).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..families.runtime import FamilyRuntime
from ..paged_cache import PagedAttentionMetadata, PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class GraphState:
    status: str                     # "captured" | "fallback" | "pending" | "off"
    reason: str | None = None       # why "fallback" or "off"
    replays: int = 0                # decode steps replayed from a graph
    buckets: tuple[int, ...] = ()   # batch sizes captured


class DecodeGraphs:
    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, max_model_len: int,
                 max_batch: int, capture: bool | None = None):
        self.runtime, self.cache, self.max_model_len = runtime, cache, max_model_len
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.capture = torch.cuda.is_available() if capture is None else capture
        self.null_block = cache.reserve_null_block()
        bs, dev, B = cache.block_size, cache.device, self.buckets[-1]
        width = -(-max_model_len // bs)
        H = runtime.text.hidden_size
        self.embeds = torch.zeros(1, B, H, dtype=runtime.lm_head.weight.dtype, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        rows = runtime.text.position_rows
        self.rope = torch.zeros(rows, B, dtype=torch.int64, device=dev) if rows > 1 else None
        self.slots = torch.zeros(B, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(B, width, dtype=torch.int32, device=dev)
        self.lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.loc = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        self.failure: str | None = None  # why capture fell back to eager decoding
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    @property
    def state(self) -> GraphState:
        if self.failure is not None:
            status, reason = "fallback", self.failure
        elif not self.capture:
            status, reason = "off", "no CUDA: the static buffers run eagerly"
        else:
            status, reason = ("captured" if self.graphs else "pending"), None
        return GraphState(status, reason, self.replays, tuple(sorted(self.graphs)))

    def run(self, meta: PagedAttentionMetadata, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, H] of a decode step whose metadata the cache just built."""
        B = meta.num_seqs
        Bp = next(b for b in self.buckets if b >= B)
        null = self.null_block
        self.embeds[0, :B].copy_(embeds)
        self.embeds[0, B:Bp].zero_()
        self.positions[:B].copy_(meta.positions)
        self.positions[B:Bp] = 0
        if self.rope is not None:
            self.rope[:, :B].copy_(meta.rope_positions)
            self.rope[:, B:Bp] = 0
        self.slots[:B].copy_(meta.slot_mapping)
        self.slots[B:Bp] = null * self.cache.block_size
        self.tables.fill_(null)
        self.tables[:B, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.lens[:B].copy_(meta.seq_lens)
        self.lens[B:Bp] = 1
        hidden = self._replay(Bp) if self.capture else self._forward(Bp)
        return hidden[0, :B]

    def _forward(self, Bp: int) -> torch.Tensor:
        rope = None if self.rope is None else self.rope[:, :Bp]
        meta = PagedAttentionMetadata(self.tables[:Bp], self.lens[:Bp], self.loc[:Bp + 1], self.positions[:Bp],
                                      self.slots[:Bp], max_query_len=1, max_seq_len=self.max_model_len,
                                      rope_positions=rope)
        return self.runtime.backbone(self.embeds[:, :Bp], self.positions[:Bp][None], self.cache.layer_caches(meta),
                                     rope_positions=None if rope is None else rope[:, None])

    def _replay(self, Bp: int) -> torch.Tensor:
        if Bp not in self.graphs:
            try:
                self._capture(Bp)
            except RuntimeError as e:  # a capture failure must cost speed, never the request
                self.failure = f"capture at batch {Bp} failed: {type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph {self.failure}; decoding eagerly from now on", RuntimeWarning)
                self.capture = False
                return self._forward(Bp)
        graph, out = self.graphs[Bp]
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, Bp: int) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._forward(Bp)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(Bp)
        self.graphs[Bp] = (graph, out)
