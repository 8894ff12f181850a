"""The kernels' inputs at the real model's shapes, one `Case` each: built on any device, judged on a GPU
by tests/test_real_shapes.py, and used on the CPU to show that the tolerance rule rejects wrong answers
at exactly these shapes.

Attention inputs carry a "needle": the newest key of each sequence has a value vector sqrt(len) times
larger, so it holds a share of the output comparable to all other keys together. A kernel that misses
the last key (or a whole page of keys) is then off by far more than rounding, even at 32k keys, where one
ordinary key's weight is below bf16's resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from autoglm_fast.kernels.adapter_attention import adapter_attention, reference_attention
from autoglm_fast.kernels.gated_fusion import gated_fusion, reference_fusion
from autoglm_fast.kernels.linear import fused_linear, reference_linear
from autoglm_fast.kernels.paged_attention import paged_prefill_attention, reference_paged_attention
from kernel_harness import DEVICE, nan_like, randn, upcast
from paged_helpers import GLM, cache_args, chunk_step, make_cache, queries, run_decode

HIDDEN, ADAPTER, ADAPTER_HEADS = 3584, 512, 8


@dataclass
class Inputs:
    run: Callable[[], torch.Tensor]          # the kernel on these inputs
    reference: Callable                      # its eager reference
    args: tuple
    kwargs: dict = field(default_factory=dict)
    # The exact (fp64) answer with one key (or one term of the sum) left out, given the exact answer.
    dropped: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Case:
    name: str
    make: Callable[[torch.dtype], Inputs]

    def __repr__(self):
        return self.name


def _adapter_attention(B, L):
    def make(dtype):
        torch.manual_seed(B * L)
        qkv = randn(B, L, 3 * ADAPTER, dtype=dtype)
        mask = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
        mask[0, L // 2:] = True
        last = (~mask).sum(1) - 1

        def dropped(exact):  # each clip's last real key, masked out
            m = mask.clone()
            m[torch.arange(B, device=DEVICE), last] = True
            return reference_attention(upcast(qkv), ADAPTER_HEADS, m)
        return Inputs(lambda: adapter_attention(qkv, ADAPTER_HEADS, mask), reference_attention,
                      (qkv, ADAPTER_HEADS, mask), dropped=dropped)
    return Case(f"adapter attention B={B} L={L}", make)


def _fusion(B, T):
    def make(dtype):
        torch.manual_seed(B + T)
        t, w, b = randn(B, T, HIDDEN, dtype=dtype), randn(3, 3 * HIDDEN, dtype=dtype, scale=HIDDEN ** -0.5), \
            randn(3, dtype=dtype)
        v, a = randn(B, HIDDEN, dtype=dtype), randn(B, HIDDEN, dtype=dtype)

        def dropped(exact):  # the first sequence's audio term left out
            has_a = torch.arange(B, device=DEVICE) > 0
            return reference_fusion(*upcast((t, w, b, v, a)), has_a=has_a)
        return Inputs(lambda: gated_fusion(t, w, b, v, a), reference_fusion, (t, w, b, v, a), dropped=dropped)
    return Case(f"gated fusion B={B} T={T}", make)


def _projection(M, K):
    def make(dtype):
        torch.manual_seed(M + K)
        x, w = randn(M, K, dtype=dtype), randn(ADAPTER, K, dtype=dtype, scale=K ** -0.5)
        kw = dict(bias=randn(ADAPTER, dtype=dtype), epilogue="layernorm", ln_weight=randn(ADAPTER, dtype=dtype),
                  ln_bias=randn(ADAPTER, dtype=dtype))

        def dropped(exact):  # the last term of every dot product
            x64 = upcast(x)
            x64[:, -1] = 0
            return reference_linear(x64, upcast(w), **upcast(kw))
        return Inputs(lambda: fused_linear(x, w, **kw), reference_linear, (x, w), kw, dropped)
    return Case(f"projection+LN M={M} K={K}", make)


def _plant_needles(cache, meta):
    """Scale the newest key's value vector of every sequence by sqrt(its length)."""
    bs, v_pool = cache.block_size, cache.v_pools[0]
    for s, n in enumerate(meta.seq_lens.tolist()):
        page = meta.block_tables[s, (n - 1) // bs].long()
        v_pool[page, (n - 1) % bs] *= math.sqrt(n)


def _drop_last_key(q, cache, meta, rows):
    """The exact answer of each sequence's last query row without the sequence's newest key."""
    kp, vp, bt, seq_lens, _ = upcast(cache_args(cache, meta))
    ends = meta.query_start_loc[1:].tolist()
    one = torch.tensor([0, 1], dtype=meta.query_start_loc.dtype, device=DEVICE)
    for s, end in enumerate(ends):
        if seq_lens[s] > 1:
            rows[end - 1] = reference_paged_attention(upcast(q[end - 1:end]), kp, vp, bt[s:s + 1],
                                                      seq_lens[s:s + 1] - 1, one)[0]
    return rows


def _decode(context, num_splits=None):
    def make(dtype):
        torch.manual_seed(context)
        lens = [context, context - 1000, 1, 33, context // 2, 700, context - 31, 5000 % context + 1]
        cache = make_cache(*GLM, 32, dtype, num_blocks=sum(-(-n // 32) for n in lens) + 8)
        meta = chunk_step(cache, [n - 1 for n in lens], [1] * len(lens))
        _plant_needles(cache, meta)
        q = queries(len(lens), *GLM, dtype)
        return Inputs(lambda: run_decode(q, meta, cache, num_splits), reference_paged_attention,
                      (q, *cache_args(cache, meta)),
                      dropped=lambda exact: _drop_last_key(q, cache, meta, exact.clone()))
    return Case(f"decode context={context}" + (f" splits={num_splits}" if num_splits else ""), make)


def _prefill(cached, new):
    def make(dtype):
        torch.manual_seed(len(new))
        cache = make_cache(*GLM, 32, dtype, num_blocks=160)
        meta = chunk_step(cache, cached, new)
        _plant_needles(cache, meta)
        q = queries(sum(new), *GLM, dtype)

        def run():
            out = nan_like(q.shape, dtype)
            return paged_prefill_attention(q, *cache_args(cache, meta), meta.max_query_len, out=out,
                                           max_seq_len=meta.max_seq_len)
        return Inputs(run, reference_paged_attention, (q, *cache_args(cache, meta)),
                      dropped=lambda exact: _drop_last_key(q, cache, meta, exact.clone()))
    return Case(f"prefill cached={cached} new={new}", make)


CASES = [
    *(_adapter_attention(B, L) for B, L in [(1, 257), (32, 257), (4, 375), (2, 1500)]),
    *(_fusion(B, T) for B, T in [(1, 1), (32, 1), (1, 4096)]),
    *(_projection(M, K) for M, K in [(257, 1024), (8 * 257, 1024), (375, 384)]),
    _decode(4096), _decode(32768), _decode(32768, num_splits=1),
    _prefill([0], [2048]), _prefill([1536, 0], [512, 2048]),
]
