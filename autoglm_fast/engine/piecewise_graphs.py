"""Prefill and mixed steps as piecewise CUDA graphs (vLLM's scheme for steps that are not pure decode).

Attention's launch grid follows the step's sequences (how many decode, how long each chunk), so it
cannot be captured once for all steps; everything else in a layer only sees a number of token rows.
So each layer is two graphs per token bucket, with attention launched eagerly between them:

    before   residual add + input norm -> qkv GEMM -> bias + RoPE + K/V cache write   (q out)
    attend   split-K decode for the one-token rows, prefill for the chunks (eager, exact rows)
    after    o GEMM -> (sandwich norm) + residual add + norm -> MLP                    (MLP out)

The residual stream and the MLP output live in two static buffers updated in place; each layer's MLP
output is added to the stream by the next layer's input norm (FastGlmModel's threading).

A step's tokens are padded to a bucket (16, 32, 64, ... up to max_num_batched_tokens): padding rows
sit at position 0 and write their K/V into the cache's reserved null block, and attention never reads
them. Per layer that is 2 graph launches and 1-2 attention launches instead of about 9 kernels,
which keeps the host from becoming the bottleneck of short chunks. The embeddings before the first
layer, the final norm and `lm_head` stay eager.

Without CUDA the same padded path runs eagerly (the tests); a step with more tokens than the largest
bucket, or after a failed capture (a warning, the reason kept), runs the plain eager backbone.
"""
from __future__ import annotations

import warnings

import torch

from ..families.runtime import FamilyRuntime
from ..fast.glm import add_norm
from ..paged_cache import PagedAttentionMetadata, PagedKVCache

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class PiecewiseGraphs:
    def __init__(self, runtime: FamilyRuntime, cache: PagedKVCache, max_tokens: int, capture: bool):
        if cache.null_block is None:
            raise ValueError("piecewise graphs need the cache's null block (reserve it first)")
        self.backbone, self.cache, self.capture = runtime.backbone, cache, capture
        self.buckets = [b for b in TOKEN_BUCKETS if b < max_tokens] + [max_tokens]
        text, n, dev = runtime.text, self.buckets[-1], cache.device
        dtype = runtime.embed_tokens.weight.dtype
        self.x = torch.zeros(n, text.hidden_size, dtype=dtype, device=dev)  # the last MLP output
        self.residual = torch.zeros_like(self.x)
        # q and o are static buffers: no layer's graph holds an output of its own
        self.q = torch.zeros(n, text.num_attention_heads, text.head_dim, dtype=dtype, device=dev)
        self.o = torch.zeros_like(self.q)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(n, dtype=torch.int64, device=dev)
        rows = text.position_rows
        self.rope = torch.zeros(rows, n, dtype=torch.int64, device=dev) if rows > 1 else None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None
        self.failure: str | None = None
        self.replays = 0

    def run(self, meta: PagedAttentionMetadata, embeds: torch.Tensor) -> torch.Tensor | None:
        """The backbone's hidden states [N, hidden] (final norm applied) for a step's embeddings [N, hidden]
        whose metadata the cache just built; None when the step is larger than the largest bucket."""
        n = embeds.shape[0]
        if n > self.buckets[-1]:
            return None
        nb = next(b for b in self.buckets if b >= n)
        x, q, o = self.x[:nb], self.q[:nb], self.o[:nb]
        x[:n].copy_(embeds)
        x[n:].zero_()
        self.positions[:n].copy_(meta.positions)
        self.positions[n:nb] = 0
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:nb] = self.cache.null_block * self.cache.block_size
        rope = None
        if self.rope is not None:
            rope = self.rope[:, :nb]
            rope[:, :n].copy_(meta.rope_positions)
            rope[:, n:] = 0
        # what the graphed pieces read: the padded rows' positions, slots and rotary rows, at fixed addresses
        padded = PagedAttentionMetadata(meta.block_tables, meta.seq_lens, meta.query_start_loc, self.positions[:nb],
                                        self.slots[:nb], meta.max_query_len, meta.max_seq_len, rope_positions=rope)
        exact, graphed = self.cache.layer_caches(meta), self.cache.layer_caches(padded)
        # The stream starts at 0 so that every layer's input norm adds (0 + embeddings is exact): one graph per
        # layer and bucket whatever its index.
        residual, pre = self.residual[:nb], None
        residual.zero_()
        for i, layer in enumerate(self.backbone.layers):
            self._piece(("before", i, nb), lambda: layer.before_attention(x, residual, pre, graphed[i], q_out=q,
                                                                           in_place=True), rewrites=(residual,))
            layer.self_attn.attend(q[:n], exact[i], out=o[:n])
            self._piece(("after", i, nb), lambda: layer.after_attention(layer.self_attn.output(o), residual, out=x,
                                                                         in_place=True), rewrites=(residual, x))
            pre = layer.post_mlp_layernorm
        return add_norm(self.backbone.norm, x[:n], residual[:n], pre)[0]

    def _piece(self, key: tuple, fn, rewrites: tuple[torch.Tensor, ...] = ()):
        if not self.capture:
            return fn()
        if key not in self.graphs:
            try:
                self._capture(key, fn, rewrites)
            except RuntimeError as e:  # a capture failure must cost speed, never the request
                self.failure = f"piecewise capture {key} failed: {type(e).__name__}: {e}"
                warnings.warn(f"CUDA graph {self.failure}; prefill and mixed steps run eagerly from now on",
                              RuntimeWarning)
                self.capture = False
                return fn()
        graph, out = self.graphs[key]
        graph.replay()
        self.replays += 1
        return out

    def _capture(self, key: tuple, fn, rewrites: tuple[torch.Tensor, ...]) -> None:
        """Warm up (Triton compiles, cuBLAS picks), then capture; the replay that follows does the step's
        work. A piece that rewrites its own inputs gets them back after the warm-up runs."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        saved = [t.clone() for t in rewrites]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in zip(rewrites, saved):
            t.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.graphs[key] = (graph, out)
