"""Adapter and fusion kernels at AutoGLM-Phone-9B's real shapes: ours vs eager vs torch.compile.

    python -m benchmarks.adapter [--json OUT] [--smoke]

GPU: triton.testing.do_bench, fp16. --smoke: tiny shapes, one timed call, any device (the interpreter
on CPU) - it checks the runner, it measures nothing worth reading.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from .common import Row, bench, compiled, format_rows, measure_ceilings


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
            rows.append(_row(name, f"{b}x{seq}x{k}->{n}", ours_ln, eager_ln, smoke,
                             bytes=(m * k + n * k + m * n) * e, flops=2 * m * n * k))
            h = ours_ln()
            qkv_flops = 2 * m * 3 * n * n + 2 * m * n * n + 4 * b * seq * seq * n  # in/out proj + attention
            rows.append(_row(name.split()[0] + " attention", f"{b}x{seq} 8x{n // 8}",
                             lambda: fast.attn_block(h), lambda: ref.attn(h, h, h, need_weights=False)[0], smoke,
                             bytes=(4 * n * n + 2 * m * n) * e, flops=qkv_flops))
            rows.append(_row(name.split()[0] + " adapter", f"{b}x{seq}x{k}->{n}", lambda: fast(x), lambda: ref(x),
                             smoke, bytes=(m * k + (k + 12 * n) * n + m * n) * e,
                             flops=2 * m * n * k + qkv_flops + 16 * m * n * n))
        ref = GatedFusion(hidden_text).to(device, dtype).eval()
        fast = FastGatedFusion.from_reference(ref)
        for r in fusion_rows:  # one sequence: r = 1 is a decode step, r = 4096 a long prefill
            t = torch.randn(1, r, hidden_text, device=device, dtype=dtype)
            v, a = torch.randn_like(t[:, 0]), torch.randn_like(t[:, 0])
            rows.append(_row("gated fusion", f"{r} rows x {hidden_text}", lambda: fast(t, v, a),
                             lambda: ref(t, v, a), smoke, bytes=(2 * r * hidden_text + 11 * hidden_text) * t.element_size(),
                             flops=6 * r * hidden_text))
    return rows, ceilings


def _row(case, shape, ours, eager, smoke, bytes, flops) -> Row:
    ms, q = {}, {}
    impls = {"ours": ours, "eager": eager, "compile": compiled(eager, smoke)}
    for impl, fn in impls.items():
        if fn is None:
            continue
        med, lo, hi = bench(fn, smoke)
        ms[impl], q[impl] = med, (lo, hi)
    return Row(case, shape, ms, q, bytes, flops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows and ceilings here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one call each, any device")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.adapter measures on a CUDA GPU; none here (use --smoke to exercise the runner)")
        return 0
    rows, ceilings = run(args.smoke)
    print(format_rows(rows, ceilings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceilings.__dict__, "rows": [r.to_dict(ceilings) for r in rows],
                       "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
