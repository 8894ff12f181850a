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


def _paged(batch: int, ctx: int, hkv: int, d: int, block: int, dtype, device):
    """Pools holding `batch` sequences of `ctx` tokens each, pages shuffled as a busy cache leaves them."""
    per_seq = -(-ctx // block)
    pools = [torch.randn(batch * per_seq, block, hkv, d, device=device, dtype=dtype) for _ in range(2)]
    tables = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
    return pools, tables, torch.full((batch,), ctx, dtype=torch.int32, device=device)


def _gathered(pool, tables, ctx: int):
    """[batch, kv_heads, ctx, head_dim]: what the pages hold, laid out contiguously for the eager baselines."""
    batch, per_seq = tables.shape
    pages = pool[tables.long()]  # [batch, per_seq, block, kv_heads, head_dim]
    return pages.reshape(batch, per_seq * pool.shape[1], *pool.shape[2:])[:, :ctx].transpose(1, 2).contiguous()


def run(rec: Recorder) -> None:
    from autoglm_fast.kernels.norms import reference_rms_norm, reference_swiglu, rms_norm, swiglu
    from autoglm_fast.kernels.paged_attention import paged_prefill_attention
    from autoglm_fast.kernels.paged_decode import paged_decode_attention
    from autoglm_fast.kernels.rotary_cache import qkv_rope_cache_write, reference_qkv_rope_cache_write
    from autoglm_fast.reference.glm import rotary_inv_freq

    device, dtype, small = rec.opts.device, rec.opts.dtype, rec.opts.small
    hq, hkv, d, block = (6, 2, 16, 16) if small else (HQ, HKV, D, BLOCK)
    hidden, inter = (72, 152) if small else (HIDDEN, INTER)
    e = torch.empty((), dtype=dtype).element_size()
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        for ctx in ([33] if small else [1024, 4096, 16384, 32768]):
            for batch in ([1, 3] if small else [1, 8, 32]):
                if not rec.selected("decode attention", f"b{batch} ctx{ctx}"):
                    continue
                (kp, vp), tables, lens = _paged(batch, ctx, hkv, d, block, dtype, device)
                q, kc, vc = randn(batch, hq, d), _gathered(kp, tables, ctx), _gathered(vp, tables, ctx)
                rec.add("decode attention", f"b{batch} ctx{ctx}", {
                    "ours": lambda: paged_decode_attention(q, kp, vp, tables, lens, ctx),
                    "eager": lambda: math_attention(q[:, :, None], kc, vc, False)[:, :, 0],
                    "sdpa": lambda: sdpa(q[:, :, None], kc, vc, False)[:, :, 0]},
                    bytes=2 * batch * ctx * hkv * d * e, flops=4 * batch * hq * ctx * d, graph=True)
                del kp, vp, kc, vc
        for T in ([40] if small else [1024, 4096, 8192]):
            if not rec.selected("prefill attention", f"causal {T}"):
                continue
            (kp, vp), tables, lens = _paged(1, T, hkv, d, block, dtype, device)
            q, loc = randn(T, hq, d), torch.tensor([0, T], dtype=torch.int32, device=device)
            qs, ks, vs = q.transpose(0, 1)[None].contiguous(), _gathered(kp, tables, T), _gathered(vp, tables, T)
            rec.add("prefill attention", f"causal {T}", {
                "ours": lambda: paged_prefill_attention(q, kp, vp, tables, lens, loc, T),
                "eager": lambda: math_attention(qs, ks, vs, True)[0].transpose(0, 1),
                "sdpa": lambda: sdpa(qs, ks, vs, True)[0].transpose(0, 1)},
                bytes=(2 * T * hq * d + 2 * T * hkv * d) * e, flops=2 * hq * d * T * T)  # causal: half of 4*T*T*d
        inv_freq = rotary_inv_freq(d // 2, 10000.0, device)
        w = randn(hidden)
        for r in ([1, 33] if small else [1, 4096]):
            width = (hq + 2 * hkv) * d
            qkv, bias = randn(r, width), randn(width)
            positions = torch.arange(r, device=device)
            slots = torch.randperm(-(-r // block) * block, device=device)[:r]
            kp, vp = (torch.zeros(-(-r // block), block, hkv, d, device=device, dtype=dtype) for _ in range(2))
            rec.add("qkv bias+rope+cache", f"{r} tokens", {
                "ours": lambda: qkv_rope_cache_write(qkv, bias, positions, slots, inv_freq, kp, vp, hq, hkv, d),
                "eager": lambda: reference_qkv_rope_cache_write(qkv, bias, positions, slots, inv_freq, kp, vp,
                                                                hq, hkv, d)},
                bytes=(r * width + width + r * hq * d + 2 * r * hkv * d) * e, graph=r == 1)
            x, res = randn(r, hidden), randn(r, hidden)
            rec.add("rmsnorm+residual", f"{r}x{hidden}", {
                "ours": lambda: rms_norm(x, w, 1.5625e-7, residual=res),
                "eager": lambda: reference_rms_norm(x, w, 1.5625e-7, residual=res)},
                bytes=4 * r * hidden * e, flops=4 * r * hidden, graph=r == 1)
            gu = randn(r, 2 * inter)
            rec.add("swiglu", f"{r}x{inter}", {"ours": lambda: swiglu(gu), "eager": lambda: reference_swiglu(gu)},
                    bytes=3 * r * inter * e, flops=5 * r * inter, graph=r == 1)
