"""Prefill-sized weight-only quantized linear (W8A16 / W4A16): a tiled GEMM that dequantizes each weight
tile in registers before tl.dot.

y [M, N] = x [M, K] @ dequantize(W)^T (+ bias), M > GEMV_MAX_ROWS (smaller M: quant_gemv.py).
- int8: the codes convert exactly to the activation dtype (|q| <= 127) and the per-channel scale
  multiplies the finished tile.
- int4: each [BLOCK_K / 2, BLOCK_N] byte tile becomes two dtype tiles, (lo - z) * s for the even k and
  (hi - z) * s for the odd k (BLOCK_K <= group_size: one scale and zero point per column per tile), and
  x is split into its even and odd k to meet them - two dots, no nibble interleave.
- Program order is grouped (GROUP_M row tiles share each column of weight tiles while it is in L2).
Configs are fixed per M bucket (no autotuning: prefill runs inside piecewise CUDA-graph captures).
Eager reference: `reference_quant_linear` in quant.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import check_launch

GROUP_M = 8
# (max rows, config); int4 BLOCK_K is capped at the group size by the launcher. Small-M buckets use narrow
# N tiles so a decode batch of 32 still spreads a 3584-wide output over ~a wave of CTAs. The 64x128 tile takes
# 8 warps: with 4, dequantizing it needed 170-240 registers a thread and int8 bf16 spilled on sm_80.
CONFIGS = [
    (32, triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4)),
    (64, triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4)),
    (256, triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)),
    (None, triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)),
]


@triton.jit
def quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_ym,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * tiles_n) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + pid % (GROUP_M * tiles_n) % rows
    pid_n = pid % (GROUP_M * tiles_n) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = q_ptr + offs_n[None, :].to(tl.int64) * stride_qn  # a [K, N] view of the [N, K(/2)] codes
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if BITS == 8:
            w = tl.load(w_cols + offs_k[:, None], mask=(offs_k < K)[:, None] & mask_n[None, :], other=0)
            if IEEE:
                acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_cols + offs_b[:, None], mask=mask_n[None, :], other=0)  # whole K tiles (K % G == 0)
            group = k0 // GROUP
            s = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            w_even = (((packed & 15).to(tl.float32) - z) * s).to(x.dtype)
            w_odd = (((packed >> 4).to(tl.float32) - z) * s).to(x.dtype)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            if IEEE:
                acc = tl.dot(x_even, w_even, acc, input_precision="ieee")
                acc = tl.dot(x_odd, w_odd, acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, w_even, acc)
                acc = tl.dot(x_odd, w_odd, acc)
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def gemm_config(bits: int, rows: int, group_size: int) -> triton.Config:
    """The fixed config of a launch with `rows` rows (int4: BLOCK_K capped at the group size)."""
    cfg = next(c for limit, c in CONFIGS if limit is None or rows <= limit)
    if bits == 4 and cfg.kwargs["BLOCK_K"] > group_size:
        cfg = triton.Config({**cfg.kwargs, "BLOCK_K": group_size}, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cfg


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
               config: triton.Config | None = None) -> torch.Tensor:
    """x [..., K] @ dequantize(W)^T (+ bias) -> [..., N] in x's dtype (into `out` if given), any number of rows.
    config: force one (tests, benchmarks)."""
    bits, N, K, group, x2, out, y2 = check_launch(x, qweight, scales, zeros, bias, out)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return out
    cfg = config or gemm_config(bits, M, group)
    if bits == 4 and group % cfg.kwargs["BLOCK_K"]:
        raise ValueError(f"config {cfg} cannot take group_size {group}")
    grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
    quant_gemm_kernel[grid](x2, qweight, scales, zeros if zeros is not None else scales,
                            bias if bias is not None else scales, y2, M, N, K, x2.stride(0), qweight.stride(0),
                            y2.stride(0), BITS=bits, GROUP=group if bits == 4 else 1, HAS_BIAS=bias is not None,
                            IEEE=x.dtype == torch.float32, GROUP_M=GROUP_M, **cfg.kwargs, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)
    return out


def compile_specs():
    """Every config at a 9B prefill-side launch of its M bucket: the MLP gate_up projection 3584 -> 2 x 13696,
    int8 and int4 at group size 128; the largest tile also at group size 32 (BLOCK_K capped to 32)."""
    from .specs import CompileSpec, TensorArg
    N, K = 2 * 13696, 3584
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        for limit, _ in CONFIGS:
            rows = 33 if limit == 64 else 17 if limit == 32 else 200 if limit == 256 else 4096
            for bits, group in ((8, 128), (4, 128)) + (((4, 32),) if limit is None else ()):  # g32: BLOCK_K 32
                cfg = gemm_config(bits, rows, group)
                args = {"x_ptr": t, "q_ptr": TensorArg("i8" if bits == 8 else "u8"),
                        "s_ptr": TensorArg("fp32") if bits == 8 else t, "z_ptr": TensorArg("u8") if bits == 4 else t,
                        "b_ptr": t, "y_ptr": t, "M": rows, "N": N, "K": K, "stride_xm": K,
                        "stride_qn": K if bits == 8 else K // 2, "stride_ym": N, "BITS": bits,
                        "GROUP": group if bits == 4 else 1, "HAS_BIAS": False, "IEEE": False, "GROUP_M": GROUP_M}
                kw = cfg.kwargs
                specs.append(CompileSpec.from_config(
                    f"quant_gemm int{bits}", quant_gemm_kernel, args, cfg,
                    label=f"{dtype} M<={limit or 'inf'} {'g' + str(group) + ' ' if bits == 4 else ''}"
                          f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"))
    return specs
