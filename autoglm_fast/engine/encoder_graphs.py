"""Encoders replayed from CUDA graphs at static shapes, as decode steps are (cuda_graphs.py).

An encoder's launches (CLIP ViT-L: 24 layers, about 10 launches each) cost more host time than a
small batch of images costs the GPU; replaying them from a graph leaves the GPU time alone. A graph
needs static shapes, so inputs are padded to a bucket:

    images / clips   the batch dimension to 1, 2, 4, 8 or 16 (zero inputs; every item is
                     independent, so a padded one changes nothing and its output is dropped)
    GLM-4.1V patches the packed patch rows to a bucket (powers of two to 1024, then multiples of
                     1024), the padding rows forming their own attention segment, and the number of
                     segments to a power of two (empty segments: their programs exit at once)

A family opts its encoders in with `FamilyRuntime.graph_encoders(graphs)`, wrapping the forward of
the module that does the work (no module is replaced: checkpoints keep their names). Without CUDA the
same padded path runs eagerly (the tests); larger inputs than the biggest bucket run eagerly as they
are. Graphs are captured on first use of a shape; a capture that fails falls back to eager for good,
with a warning, as decode graphs do.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

BATCH_BUCKETS = (1, 2, 4, 8, 16)
MAX_PATCHES = 32768


def patch_bucket(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length()) if n <= 1024 else -(-n // 1024) * 1024


class EncoderGraphs:
    def __init__(self, capture: bool):
        self.capture = capture
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.pool = None
        self.failure: str | None = None
        self.replays = 0

    def run(self, key: tuple, fn, inputs: list[torch.Tensor]) -> torch.Tensor:
        """fn(*inputs) for inputs of a fixed shape per key: replayed from a graph (a fresh output tensor)."""
        if not self.capture:
            return fn(*inputs)
        if key not in self.graphs:
            try:
                self._capture(key, fn, inputs)
            except RuntimeError as e:  # a capture failure must cost speed, never the request
                self.failure = f"encoder capture {key} failed: {type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph {self.failure}; encoding eagerly from now on", RuntimeWarning)
                self.capture = False
                return fn(*inputs)
        graph, static, out = self.graphs[key]
        for buf, x in zip(static, inputs):
            buf.copy_(x)
        graph.replay()
        self.replays += 1
        return out.clone()  # the next replay overwrites `out`

    def _capture(self, key: tuple, fn, inputs: list[torch.Tensor]) -> None:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static)
        self.graphs[key] = (graph, static, out)

    # ---- the padding schemes ----------------------------------------------------------------------
    def batched(self, name: str, forward):
        """forward(x [N, ...]) -> [N, ...], run at N padded to a batch bucket."""
        def run(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            if n > BATCH_BUCKETS[-1]:
                return forward(x)
            nb = next(b for b in BATCH_BUCKETS if b >= n)
            padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, nb - n)) if nb > n else x
            return self.run((name, nb, tuple(x.shape[1:]), x.dtype), forward, [padded])[:n]
        return run

    def packed_segments(self, name: str, run_blocks):
        """run_blocks(x [N, D], cos, sin [N, d], cu_seqlens [S + 1]) -> [N, D] (varlen attention inside),
        run at N padded to a patch bucket and S to a power of two."""
        def run(x, cos, sin, cu_seqlens):
            n, segments = x.shape[0], cu_seqlens.shape[0] - 1
            if n > MAX_PATCHES:
                return run_blocks(x, cos, sin, cu_seqlens)
            nb = patch_bucket(n)
            sb = 1 << segments.bit_length()  # room for the padding segment, then empty ones
            pad_rows = (0, 0, 0, nb - n)
            cu = torch.cat([cu_seqlens.to(torch.int32),
                            torch.full((sb - segments,), nb, dtype=torch.int32, device=cu_seqlens.device)])
            key = (name, nb, sb, tuple(x.shape[1:]), x.dtype)
            return self.run(key, run_blocks, [F.pad(x, pad_rows), F.pad(cos, pad_rows), F.pad(sin, pad_rows), cu])[:n]
        return run
