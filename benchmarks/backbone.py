"""Backbone kernels at AutoGLM-Phone-9B's real shapes: ours vs eager vs torch.compile (and SDPA).

    python -m benchmarks.backbone [--json OUT] [--smoke]

Decode attention over the paged cache at context 1k/4k/16k/32k x batch 1/8/32 (GB/s, % of measured
copy bandwidth), causal prefill attention at 1k/4k/8k (TFLOP/s, % of measured matmul peak) against
F.scaled_dot_product_attention, RMSNorm (+ residual) and SwiGLU at 1 and 4096 rows.
--smoke: tiny shapes, one call each, on any device (the interpreter on CPU).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .common import Row, cli, measure, measure_ceilings

HQ, HKV, D, HIDDEN, INTER, BLOCK = 28, 2, 128, 3584, 26880, 32


def _sdpa_gqa(q, k, v, causal):
    """Eager baseline: SDPA with the KV heads repeated for their query groups."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                          is_causal=causal)


def _paged(batch: int, ctx: int, hkv: int, d: int, block: int, dtype, device):
    """Pools holding `batch` sequences of `ctx` tokens each, pages shuffled as a busy cache leaves them."""
    per_seq = -(-ctx // block)
    pools = [torch.randn(batch * per_seq, block, hkv, d, device=device, dtype=dtype) for _ in range(2)]
    tables = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
    return pools, tables, torch.full((batch,), ctx, dtype=torch.int32, device=device)


def run(smoke: bool = False):
    from autoglm_fast.kernels.norms import reference_rms_norm, reference_swiglu, rms_norm, swiglu
    from autoglm_fast.kernels.paged_attention import paged_decode_attention, paged_prefill_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    ceilings = measure_ceilings(smoke)
    hq, hkv, d, block = (6, 2, 16, 16) if smoke else (HQ, HKV, D, BLOCK)
    rows: list[Row] = []
    e = torch.tensor([], dtype=dtype).element_size()
    with torch.no_grad():
        for ctx in ([33] if smoke else [1024, 4096, 16384, 32768]):
            for batch in ([1, 3] if smoke else [1, 8, 32]):
                (kp, vp), tables, lens = _paged(batch, ctx, hkv, d, block, dtype, device)
                q = torch.randn(batch, hq, d, device=device, dtype=dtype)
                kc = torch.randn(batch, hkv, ctx, d, device=device, dtype=dtype)
                vc = torch.randn_like(kc)
                ours = lambda: paged_decode_attention(q, kp, vp, tables, lens, ctx)  # noqa: E731
                eager = lambda: _sdpa_gqa(q[:, :, None], kc, vc, False)  # noqa: E731
                rows.append(measure("decode attention", f"b{batch} ctx{ctx}", ours, eager, smoke,
                                 bytes=2 * batch * ctx * hkv * d * e, flops=4 * batch * hq * ctx * d))
        for T in ([40] if smoke else [1024, 4096, 8192]):
            (kp, vp), tables, lens = _paged(1, T, hkv, d, block, dtype, device)
            q = torch.randn(T, hq, d, device=device, dtype=dtype)
            loc = torch.tensor([0, T], dtype=torch.int32, device=device)
            qs, ks = torch.randn(1, hq, T, d, device=device, dtype=dtype), torch.randn(1, hkv, T, d, device=device,
                                                                                      dtype=dtype)
            ours = lambda: paged_prefill_attention(q, kp, vp, tables, lens, loc, T)  # noqa: E731
            sdpa = lambda: _sdpa_gqa(qs, ks, ks, True)  # noqa: E731
            rows.append(measure("prefill attention", f"causal {T}", ours, sdpa, smoke,
                             bytes=(2 * T * hq * d + 2 * T * hkv * d) * e, flops=2 * hq * d * T * T))
        hidden, inter = (72, 152) if smoke else (HIDDEN, INTER)
        w = torch.randn(hidden, device=device, dtype=dtype)
        for r in ([1, 33] if smoke else [1, 4096]):
            x, res = torch.randn(r, hidden, device=device, dtype=dtype), torch.randn(r, hidden, device=device,
                                                                                     dtype=dtype)
            rows.append(measure("rmsnorm+residual", f"{r}x{hidden}", lambda: rms_norm(x, w, 1.5625e-7, residual=res),
                             lambda: reference_rms_norm(x, w, 1.5625e-7, residual=res), smoke,
                             bytes=4 * r * hidden * e, flops=4 * r * hidden))
            gu = torch.randn(r, 2 * inter, device=device, dtype=dtype)
            rows.append(measure("swiglu", f"{r}x{inter}", lambda: swiglu(gu), lambda: reference_swiglu(gu), smoke,
                             bytes=3 * r * inter * e, flops=5 * r * inter))
    return rows, ceilings


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, "benchmarks.backbone", run, argv)


if __name__ == "__main__":
    sys.exit(main())
