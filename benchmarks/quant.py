"""Weight-only int8 / int4 (issue 18): the quantized linear kernels and the quantized engine's decode.

Kernel rows (`--suite kernels`, case "quant gemv" for M <= 16 rows, "quant gemm" above): the 9B decoder's
qkv, gate_up and down projections (autoglm-phone-9b's shapes, from its preset) at M = 1, 8, 32, 512, int8
and int4 (groups of 128) through `quant_linear`, against cuBLAS fp16 `F.linear` on the unquantized weight
of the same shape and the eager dequantize-then-linear reference (+ its torch.compile). The GEMV's down
projection takes GLM's gate_up output and forms the SwiGLU in its loads, so its cuBLAS baseline runs the
SwiGLU kernel first (as the unquantized decode MLP does); the GEMM takes the SwiGLU's output. Bytes: the
quantized weight as stored (codes + scales + zero points) plus x and y - % roofline is of the measured
copy bandwidth, SPEC §4's ">= 80 %" for the GEMV. Decode-sized rows (M <= 32) are CUDA-graph timed over
rotated copies past 2x L2 (weights come from HBM, as in the model), M = 512 on the stream.

E2E rows (`--suite e2e`, "quant decode b1", "quant throughput b8 / b32"): the autoglm-phone-9b preset
(seeded random weights, towers dropped: decode never runs them) with quantization int8 / int4 vs the same
engine unquantized (the "unquantized" column; vs unquantized = SPEC §4's speedup: int4 >= 2.5x, int8 >=
1.7x at batch 1). decode b1 is the median step time once one request decodes (e2e._decode_ms), the
throughput rows ms per generated token of that many requests (e2e._ms_per_token, prefill included). The
roofline: the weight bytes one decode step reads as stored (runtime.decode_weight_bytes) plus the KV cache
it reads, per generated token. Headline rows (--part headline): decode b1. --shapes small: tiny
projections at 1 and 17 rows, the nano preset at batch 1 (the interpreter takes seconds per token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Recorder
from .variants import compare_engines

GROUP_SIZE = 128
PRESET = "autoglm-phone-9b"


def _projections(small: bool) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, swiglu input) of the decoder's projections, from the 9B preset (tiny ones when small).
    down's GEMV input is gate_up's output [M, 2K]: the kernel forms silu(gate) * up as it loads x."""
    if small:
        hidden, inter, qkv = 128, 256, 160
    else:
        from autoglm_fast.families import family_for_preset
        text = family_for_preset(PRESET).preset(PRESET).text
        hidden, inter = text.hidden_size, text.intermediate_size
        qkv = (text.num_attention_heads + 2 * text.num_key_value_heads) * text.head_dim
    return [("qkv", qkv, hidden, False), ("gate_up", 2 * inter, hidden, False), ("down", hidden, inter, True)]


def _quantized(weight: torch.Tensor, method: str) -> tuple:
    from autoglm_fast.kernels.quant import quantize_int4, quantize_int8
    return (*quantize_int8(weight), None) if method == "int8" else quantize_int4(weight, GROUP_SIZE)


def _stored_bytes(n: int, k: int, method: str, scale_bytes: int) -> int:
    """An [n, k] weight as kernels/quant.py stores it: int8 codes + an fp32 scale per output channel, or two
    int4 codes a byte + a scale (the model's dtype) and a uint8 zero point per group of GROUP_SIZE."""
    if method == "int8":
        return n * k + 4 * n
    return n * k // 2 + (k // GROUP_SIZE) * n * (scale_bytes + 1)


def run_kernels(rec: Recorder) -> None:
    from autoglm_fast.kernels.norms import swiglu
    from autoglm_fast.kernels.quant import GEMV_MAX_ROWS, quant_linear, reference_quant_linear

    if rec.opts.part == "headline":
        return  # no headline rows here
    device, dtype, small = rec.opts.device, rec.opts.dtype, rec.opts.small
    e = torch.empty((), dtype=dtype).element_size()
    # M outermost: a time box that cuts the run keeps the batch-1 GEMV rows (SPEC §4's target)
    for m in ((1, 17) if small else (1, 8, 32, 512)):
        kind = "gemv" if m <= GEMV_MAX_ROWS else "gemm"
        for method in rec.opts.quantization:
            for name, n, k, swiglu_input in _projections(small):
                fused = swiglu_input and kind == "gemv"  # only the GEMV forms the SwiGLU in its loads
                width = 2 * k if fused else k
                shape = f"{method} {name}{'+swiglu' if fused else ''} {m}x{width}->{n}"
                if not rec.selected(f"quant {kind}", shape):
                    continue

                def inputs(m=m, n=n, k=k, width=width, method=method):
                    weight = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
                    return (torch.randn(m, width, device=device, dtype=dtype), *_quantized(weight, method), weight)

                cublas = ({"cublas+swiglu": lambda x, q, s, z, w: F.linear(swiglu(x), w)} if fused else
                          {"cublas": lambda x, q, s, z, w: F.linear(x, w)})
                rec.add(f"quant {kind}", shape, {
                    "ours": lambda x, q, s, z, w, fused=fused: quant_linear(x, q, s, z, swiglu=fused),
                    **cublas,
                    "eager": lambda x, q, s, z, w, fused=fused: reference_quant_linear(x, q, s, z, swiglu=fused)},
                    inputs=inputs, bytes=_stored_bytes(n, k, method, e) + (m * width + m * n) * e,
                    flops=2 * m * n * k, graph=m <= 32)


def run_e2e(rec: Recorder) -> None:
    from autoglm_fast.engine import Engine
    opts = rec.opts
    preset = "nano" if opts.small else PRESET
    compare_engines(rec, "quant", preset, opts.quantization, "unquantized", lambda method, sched: Engine.from_preset(
        preset, dtype=opts.dtype, device=opts.device, scheduler=sched, backend="fast", cuda_graphs=True,
        enable_prefix_caching=False, load_vision=False, load_audio=False, quantization=method))
