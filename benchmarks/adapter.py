"""Adapter and fusion kernels at AutoGLM-Phone-9B's real shapes: ours vs eager vs torch.compile.

    python -m benchmarks.adapter [--json OUT] [--smoke]

GPU: triton.testing.do_bench, fp16. --smoke: tiny shapes, one timed call, any device (the interpreter
on CPU) - it checks the runner, it measures nothing worth reading.
"""
from __future__ import annotations

import sys

import torch

from .common import Row, cli, measure, measure_ceilings


def _cases(smoke: bool):
    """(case, shape label, batch, seq, in_dim, hidden) for the adapters; rows x width for the fusion."""
    if smoke:
        return [("vision proj+LN", 1, 10, 48, 56), ("audio proj+LN", 2, 13, 40, 56)], [1, 33], 72
    vision = [("vision proj+LN", b, 257, 1024, 512) for b in (1, 8, 32)]
    return vision + [("audio proj+LN", 1, 375, 384, 512)], [1, 4096], 3584


def run(smoke: bool = False) -> tuple[list[Row], object]:
    from autoglm_fast.fast import FastDualPathAdapter, FastGatedFusion
    from autoglm_fast.kernels.linear import fused_linear
    from autoglm_fast.reference.adapter import DualPathAdapter
    from autoglm_fast.reference.fusion import GatedFusion

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    ceilings = measure_ceilings(smoke)
    rows: list[Row] = []
    adapter_cases, fusion_rows, hidden_text = _cases(smoke)
    with torch.no_grad():
        for name, b, seq, k, n in adapter_cases:
            ref = DualPathAdapter(k, n).to(device, dtype).eval()
            fast = FastDualPathAdapter.from_reference(ref)
            x = torch.randn(b, seq, k, device=device, dtype=dtype)
            m, e = b * seq, x.element_size()
            eager_ln = lambda: ref.ln(ref.proj(x))  # noqa: E731
            ours_ln = lambda: fused_linear(x, ref.proj.weight, ref.proj.bias, epilogue="layernorm",  # noqa: E731
                                           ln_weight=ref.ln.weight, ln_bias=ref.ln.bias, eps=ref.ln.eps)
            rows.append(measure(name, f"{b}x{seq}x{k}->{n}", ours_ln, eager_ln, smoke,
                             bytes=(m * k + n * k + m * n) * e, flops=2 * m * n * k))
            h = ours_ln()
            qkv_flops = 2 * m * 3 * n * n + 2 * m * n * n + 4 * b * seq * seq * n  # in/out proj + attention
            rows.append(measure(name.split()[0] + " attention", f"{b}x{seq} 8x{n // 8}",
                             lambda: fast.attn_block(h), lambda: ref.attn(h, h, h, need_weights=False)[0], smoke,
                             bytes=(4 * n * n + 2 * m * n) * e, flops=qkv_flops))
            rows.append(measure(name.split()[0] + " adapter", f"{b}x{seq}x{k}->{n}", lambda: fast(x), lambda: ref(x),
                             smoke, bytes=(m * k + (k + 12 * n) * n + m * n) * e,
                             flops=2 * m * n * k + qkv_flops + 16 * m * n * n))
        ref = GatedFusion(hidden_text).to(device, dtype).eval()
        fast = FastGatedFusion.from_reference(ref)
        for r in fusion_rows:  # one sequence: r = 1 is a decode step, r = 4096 a long prefill
            t = torch.randn(1, r, hidden_text, device=device, dtype=dtype)
            v, a = torch.randn_like(t[:, 0]), torch.randn_like(t[:, 0])
            rows.append(measure("gated fusion", f"{r} rows x {hidden_text}", lambda: fast(t, v, a),
                             lambda: ref(t, v, a), smoke, bytes=(2 * r * hidden_text + 11 * hidden_text) * t.element_size(),
                             flops=6 * r * hidden_text))
    return rows, ceilings


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, "benchmarks.adapter", run, argv)


if __name__ == "__main__":
    sys.exit(main())
