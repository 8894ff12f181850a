"""Adapter and fusion kernels: projection + LayerNorm, adapter attention, FFN epilogues, the whole
adapter, and the gated fusion - ours vs eager vs torch.compile.

Real shapes (SPEC §2-3): CLIP features 257 x 1024 and Whisper features 375 x 384 into the 512-wide
adapter (8 heads x 64), at several batches; the fusion over 3584-wide rows at 1 (a decode step) and
4096 (a long prefill) positions. Part of `autoglm-fast bench --suite kernels`.
"""
from __future__ import annotations

import torch

from .common import Recorder


def _cases(small: bool):
    """(modality, batch, tokens, in_dim), adapter width, heads, text width, fusion rows."""
    if small:
        return [("vision", 1, 10, 48), ("audio", 2, 13, 40)], 56, 8, 72, [1, 33]
    return ([("vision", b, 257, 1024) for b in (1, 8, 32)] + [("audio", b, 375, 384) for b in (1, 8)],
            512, 8, 3584, [1, 4096])


def run(rec: Recorder) -> None:
    from autoglm_fast.fast import FastDualPathAdapter, FastGatedFusion
    from autoglm_fast.kernels.linear import fused_linear
    from autoglm_fast.reference.adapter import DualPathAdapter
    from autoglm_fast.reference.fusion import GatedFusion

    if rec.opts.part == "headline":
        return  # no headline rows here (and building the adapters is not free in the interpreter)
    device, dtype = rec.opts.device, rec.opts.dtype
    e = torch.empty((), dtype=dtype).element_size()
    adapters, n, heads, hidden_text, fusion_rows = _cases(rec.opts.small)
    with torch.no_grad():
        for modality, b, seq, k in adapters:
            ref = DualPathAdapter(k, n, num_heads=heads).to(device, dtype).eval()
            fast = FastDualPathAdapter.from_reference(ref)
            x = torch.randn(b, seq, k, device=device, dtype=dtype)
            m, shape = b * seq, f"{b}x{seq}x{k}->{n}"
            rec.add(f"{modality} proj+LN", shape, {
                "ours": lambda: fused_linear(x, ref.proj.weight, ref.proj.bias, epilogue="layernorm",
                                             ln_weight=ref.ln.weight, ln_bias=ref.ln.bias, eps=ref.ln.eps),
                "eager": lambda: ref.ln(ref.proj(x))},
                bytes=(m * k + n * k + m * n) * e, flops=2 * m * n * k)
            h = ref.ln(ref.proj(x))
            attn_flops = 2 * m * 4 * n * n + 4 * b * seq * seq * n  # q/k/v/out projections + QK^T and PV
            rec.add(f"{modality} attention", f"{b}x{seq} {heads}x{n // heads}", {
                "ours": lambda: fast.attn_block(h),
                "eager": lambda: ref.attn(h, h, h, need_weights=False)[0]},
                bytes=(4 * n * n + 2 * m * n) * e, flops=attn_flops)
            up, down = ref.ffn[0], ref.ffn[2]
            hidden = fused_linear(h, up.weight, up.bias, epilogue="gelu")
            rec.add(f"{modality} ffn up+GELU", f"{m}x{n}->{4 * n}", {
                "ours": lambda: fused_linear(h, up.weight, up.bias, epilogue="gelu"),
                "eager": lambda: torch.nn.functional.gelu(up(h))},
                bytes=(m * n + 4 * n * n + 4 * m * n) * e, flops=8 * m * n * n)
            rec.add(f"{modality} ffn down+residual", f"{m}x{4 * n}->{n}", {
                "ours": lambda: fused_linear(hidden, down.weight, down.bias, epilogue="residual", residual=h),
                "eager": lambda: h + down(hidden)},
                bytes=(4 * m * n + 4 * n * n + 2 * m * n) * e, flops=8 * m * n * n)
            rec.add(f"{modality} adapter", shape, {"ours": lambda: fast(x), "eager": lambda: ref(x)},
                    bytes=(m * k + (k + 12 * n) * n + m * n) * e, flops=2 * m * n * k + attn_flops + 16 * m * n * n)

        def fusion():  # its own gate weights too: in a decode step the other weights went through L2 since
            ref = GatedFusion(hidden_text).to(device, dtype).eval()
            return ref, FastGatedFusion.from_reference(ref)

        for r in fusion_rows:  # one sequence: 1 row is a decode step, 4096 a long prefill
            rec.add("gated fusion", f"{r} rows x {hidden_text}", {
                "ours": lambda ref, fast, t, v, a: fast(t, v, a), "eager": lambda ref, fast, t, v, a: ref(t, v, a)},
                inputs=lambda r=r: (*fusion(), torch.randn(1, r, hidden_text, device=device, dtype=dtype),
                                    *torch.randn(2, 1, hidden_text, device=device, dtype=dtype)),
                bytes=(2 * r * hidden_text + 11 * hidden_text) * e, flops=6 * r * hidden_text, graph=r == 1)
