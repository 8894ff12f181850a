"""Backbone kernels: paged decode and prefill attention, q/k/v bias + RoPE + cache write, RMSNorm
(+ residual), SwiGLU - ours vs eager vs torch.compile (and SDPA for attention).

Real shapes (SPEC §2, 28 query heads / 2 KV heads x 128, hidden 3584, MLP 26880): decode over context
1k/4k/16k/32k x batch 1/8/32 (GB/s of KV read, % of copy bandwidth), causal prefill at 1k/4k/8k
(TFLOP/s, % of matmul peak), norms and SwiGLU at 1 and 4096 rows. Part of `autoglm-fast bench`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Recorder

HQ, HKV, D, HIDDEN, INTER, BLOCK = 28, 2, 128, 3584, 26880, 32


def math_attention(q, k, v, causal: bool):
    """Eager attention as HF's `eager` path does it: repeat the KV heads, matmul, softmax in fp32, matmul."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        tq, tk = scores.shape[-2:]
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def sdpa(q, k, v, causal: bool):
    """F.scaled_dot_product_attention with native GQA where torch has it (2.5+), else repeated KV heads."""
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:
        groups = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                              is_causal=causal)


def _paged(batch: int, ctx: int, block: int, device):
    """Block tables and lengths of `batch` sequences of `ctx` tokens each, pages shuffled as a busy cache
    leaves them (one table for all layers, as in the model)."""
    per_seq = -(-ctx // block)
    tables = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
    return tables, torch.full((batch,), ctx, dtype=torch.int32, device=device)


def _pool(tables, block: int, hkv: int, d: int, dtype):
    """One layer's K and V pools for `tables`' pages."""
    return [torch.randn(tables.numel(), block, hkv, d, device=tables.device, dtype=dtype) for _ in range(2)]


def _gathered(pool, tables, ctx: int):
    """[batch, kv_heads, ctx, head_dim]: what the pages hold, laid out contiguously for the eager baselines."""
    batch, per_seq = tables.shape
    pages = pool[tables.long()]  # [batch, per_seq, block, kv_heads, head_dim]
    return pages.reshape(batch, per_seq * pool.shape[1], *pool.shape[2:])[:, :ctx].transpose(1, 2).contiguous()


def run(rec: Recorder) -> None:
    from autoglm_fast.kernels.norms import reference_rms_norm, reference_swiglu, rms_norm, swiglu
    from autoglm_fast.kernels.paged_attention import paged_prefill_attention
    from autoglm_fast.kernels.paged_decode import paged_decode_attention
    from autoglm_fast.kernels.rotary_cache import (qkv_rope_cache_write, reference_qkv_rope_cache_write,
                                                   rope_cos_sin_cache)
    from autoglm_fast.kernels.swiglu_down import MAX_ROWS as SWIGLU_DOWN_ROWS, reference_swiglu_down, swiglu_down
    from autoglm_fast.reference.glm import rotary_inv_freq

    device, dtype, small = rec.opts.device, rec.opts.dtype, rec.opts.small
    hq, hkv, d, block = (6, 2, 16, 16) if small else (HQ, HKV, D, BLOCK)
    hidden, inter = (72, 152) if small else (HIDDEN, INTER)
    e = torch.empty((), dtype=dtype).element_size()
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    # Each row's inputs() makes one layer's worth (its KV pages, weights, activations); the graph-timed rows
    # rotate through as many as exceed 2x L2. What the layers share in the model (block tables, positions,
    # slots, the RoPE frequencies) is made once.
    def decode():
        for ctx in ([33] if small else [1024, 4096, 16384, 32768]):
            for batch in ([1, 3] if small else [1, 8, 32]):
                headline = small or ctx in (4096, 32768)
                if not rec.selected("decode attention", f"b{batch} ctx{ctx}", headline):
                    continue
                tables, lens = _paged(batch, ctx, block, device)

                def inputs(batch=batch, ctx=ctx, tables=tables):
                    kp, vp = _pool(tables, block, hkv, d, dtype)
                    return randn(batch, hq, d), kp, vp, _gathered(kp, tables, ctx), _gathered(vp, tables, ctx)

                rec.add("decode attention", f"b{batch} ctx{ctx}", {
                    "ours": lambda q, kp, vp, kc, vc, ctx=ctx, tables=tables, lens=lens: paged_decode_attention(
                        q, kp, vp, tables, lens, ctx),
                    "eager": lambda q, kp, vp, kc, vc: math_attention(q[:, :, None], kc, vc, False)[:, :, 0],
                    "sdpa": lambda q, kp, vp, kc, vc: sdpa(q[:, :, None], kc, vc, False)[:, :, 0]},
                    inputs=inputs, bytes=2 * batch * ctx * hkv * d * e, flops=4 * batch * hq * ctx * d, graph=True,
                    headline=headline)

    def prefill():
        for T in ([40] if small else [1024, 4096, 8192]):
            headline = small or T == 4096
            if not rec.selected("prefill attention", f"causal {T}", headline):
                continue
            tables, lens = _paged(1, T, block, device)
            kp, vp = _pool(tables, block, hkv, d, dtype)
            q, loc = randn(T, hq, d), torch.tensor([0, T], dtype=torch.int32, device=device)
            qs, ks, vs = q.transpose(0, 1)[None].contiguous(), _gathered(kp, tables, T), _gathered(vp, tables, T)
            rec.add("prefill attention", f"causal {T}", {  # compute-bound, stream-timed: one copy
                "ours": lambda: paged_prefill_attention(q, kp, vp, tables, lens, loc, T),
                "eager": lambda: math_attention(qs, ks, vs, True)[0].transpose(0, 1),
                "sdpa": lambda: sdpa(qs, ks, vs, True)[0].transpose(0, 1)},
                bytes=(2 * T * hq * d + 2 * T * hkv * d) * e, flops=2 * hq * d * T * T,  # causal: half of 4*T*T*d
                headline=headline)

    def pointwise():
        cos_sin = rope_cos_sin_cache(rotary_inv_freq(d // 2, 10000.0, device), 64 if small else 32768)
        for r in ([1, 33] if small else [1, 4096]):
            width = (hq + 2 * hkv) * d
            positions = torch.arange(r, device=device)
            slots = torch.randperm(-(-r // block) * block, device=device)[:r]
            pool = lambda: torch.zeros(-(-r // block), block, hkv, d, device=device, dtype=dtype)  # noqa: E731
            rec.add("qkv bias+rope+cache", f"{r} tokens", {
                "ours": lambda qkv, bias, kp, vp:
                    qkv_rope_cache_write(qkv, bias, positions, slots, cos_sin, kp, vp, hq, hkv, d),
                "eager": lambda qkv, bias, kp, vp:
                    reference_qkv_rope_cache_write(qkv, bias, positions, slots, cos_sin, kp, vp, hq, hkv, d)},
                inputs=lambda: (randn(r, width), randn(width), pool(), pool()),
                bytes=(r * width + width + r * hq * d + 2 * r * hkv * d) * e, graph=r == 1)
            rec.add("rmsnorm+residual", f"{r}x{hidden}", {
                "ours": lambda x, res, w: rms_norm(x, w, 1.5625e-7, residual=res),
                "eager": lambda x, res, w: reference_rms_norm(x, w, 1.5625e-7, residual=res)},
                inputs=lambda: (randn(r, hidden), randn(r, hidden), randn(hidden)),
                bytes=4 * r * hidden * e, flops=4 * r * hidden, graph=r == 1)
            rec.add("swiglu", f"{r}x{inter}", {"ours": swiglu, "eager": reference_swiglu},
                    inputs=lambda: (randn(r, 2 * inter),), bytes=3 * r * inter * e, flops=5 * r * inter, graph=r == 1)
            if r <= SWIGLU_DOWN_ROWS:  # the decode MLP's one-launch down projection vs cuBLAS after the SwiGLU kernel
                rec.add("mlp down+swiglu", f"{r}x{inter}->{hidden}", {
                    "ours": swiglu_down, "cublas+swiglu": lambda gate_up, w: F.linear(swiglu(gate_up), w),
                    "eager": reference_swiglu_down},
                    inputs=lambda: (randn(r, 2 * inter), randn(hidden, inter) * inter ** -0.5),
                    bytes=(2 * r * inter + hidden * inter + r * hidden) * e, flops=2 * r * inter * hidden, graph=True)

    # --part rest: the headline stage already ran the main decode and prefill shapes; the norm and SwiGLU
    # rows (SPEC targets too, and quick) go first in case a time box cuts the rest
    with torch.no_grad():
        for section in (pointwise, decode, prefill) if rec.opts.part == "rest" else (decode, prefill, pointwise):
            section()
