"""Whole decode steps from captured CUDA graphs, at bucketed batch sizes (the gpt-fast / vLLM practice).

One graph is one decode step, end to end: it applies the step's block-table diffs, gathers each row's
last token, block table and family constants from the persistent batch (batch.py), embeds (and, for
the seed model, gated-fuses) the tokens, runs every layer and the final norm, `lm_head` and sampling
(temperature, top-k/p, min-p, penalties, min_tokens, logprobs), and writes each row's new token and
counts back. Its only input is the step's staged host integers (one non-blocking copy); its only output
is one packed tensor of tokens (and logprobs), read back once. A graph is captured per (bucket,
SamplingPlan): a greedy batch never sorts the vocabulary.

Padded rows read the null row, whose block table points at the cache's reserved null block: they write
their K/V there and attend to it alone, so they never touch a real sequence. The split-K decode kernel
is launched for `max_model_len`, so its grid does not change from step to step; splits past a
sequence's end exit at once.

Seeded sampling rows draw from their own torch.Generator, which a graph cannot replay: a batch with
one samples eagerly after a graph that ends at the logits (a per-batch fallback; SamplingPlan.seeded).

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
from ..sampling import SamplingPlan, pack
from .batch import BELOW_MIN, DIFF_BLOCK, DIFF_COL, DIFF_ROW, POSITIONS, ROWS, PersistentBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class GraphState:
    status: str                     # "captured" | "fallback" | "pending" | "off"
    reason: str | None = None       # why "fallback" or "off"
    replays: int = 0                # decode steps replayed from a graph
    buckets: tuple[int, ...] = ()   # batch sizes captured


class DecodeGraphs:
    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, batch: PersistentBatch, max_model_len: int,
                 capture: bool | None = None):
        self.runtime, self.cache, self.batch, self.max_model_len = runtime, cache, batch, max_model_len
        max_batch = batch.capacity
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.capture = torch.cuda.is_available() if capture is None else capture
        batch.set_null_block(cache.reserve_null_block())
        self.loc = torch.arange(max_batch + 1, dtype=torch.int32, device=cache.device)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
        return GraphState(status, reason, self.replays, tuple(sorted({k[0] for k in self.graphs})))

    def run(self, requests, plan: SamplingPlan, below_min: list[bool], generators=None) -> list[list[float]]:
        """Decode one token for each request (its last token is in the batch, its new block reserved;
        below_min: still short of min_tokens); returns `pack`'s rows as host lists: the step's single
        device-to-host read."""
        B = len(requests)
        Bp = next(b for b in self.buckets if b >= B)
        self.batch.stage(requests, [r.num_computed for r in requests], below_min, Bp)
        if plan.seeded:  # the graph stops at the logits; the seeded rows' generators sample eagerly
            logits = self._launch((Bp, None))
            staged = self.batch.staged[:, :Bp]
            gens = list(generators) + [None] * (Bp - B)
            packed = pack(self.batch.sampling.sample(logits, staged[ROWS], plan, staged[BELOW_MIN].bool(), gens))
        else:
            packed = self._launch((Bp, plan))
        return packed[:B].tolist()

    def _launch(self, key: tuple) -> torch.Tensor:
        return self._replay(key) if self.capture else self._step(*key)

    def _step(self, Bp: int, plan: SamplingPlan | None) -> torch.Tensor:
        """The decode step the graph holds: packed samples, or the logits when plan is None."""
        b, bs = self.batch, self.cache.block_size
        staged = b.staged[:, :Bp]
        rows, pos = staged[ROWS], staged[POSITIONS]
        b.block_tables.index_put_((staged[DIFF_ROW], staged[DIFF_COL]), staged[DIFF_BLOCK].to(torch.int32))
        tables = b.block_tables[rows]
        slots = tables.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
        rope = b.inputs.rope_positions(pos, rows)
        meta = PagedAttentionMetadata(tables, (pos + 1).to(torch.int32), self.loc[:Bp + 1], pos, slots,
                                      max_query_len=1, max_seq_len=self.max_model_len, rope_positions=rope,
                                      num_decodes=Bp)
        embeds = b.inputs.embeds(b.sampling.last_token[rows], rows)
        hidden = self.runtime.backbone(embeds[None], pos[None], self.cache.layer_caches(meta),
                                       rope_positions=None if rope is None else rope[:, None])
        logits = self.runtime.lm_head(hidden[0])
        if plan is None:
            return logits
        return pack(b.sampling.sample(logits, rows, plan, staged[BELOW_MIN].bool()))

    def _replay(self, key: tuple) -> torch.Tensor:
        if key not in self.graphs:
            try:
                self._capture(key)
            except RuntimeError as e:  # a capture failure must cost speed, never the request
                self.failure = f"capture at batch {key[0]} failed: {type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph {self.failure}; decoding eagerly from now on", RuntimeWarning)
                self.capture = False
                return self._step(*key)
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, key: tuple) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Warm-up and capture run the step for real: keep the batch's device state as it was.
        saved = self._device_state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(*key)
        self._restore(saved)
        self.graphs[key] = (graph, out)

    def _device_state(self) -> list[torch.Tensor]:
        s = self.batch.sampling
        return [t.clone() for t in (s.last_token, s.output_counts)]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        s = self.batch.sampling
        for t, old in zip((s.last_token, s.output_counts), saved):
            t.copy_(old)
