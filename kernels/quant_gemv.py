"""Decode-sized weight-only quantized linear (W8A16 / W4A16): a split-K GEMV, ONE launch.

y [M, N] = x [M, K] @ dequantize(W)^T (+ bias) for M <= GEMV_MAX_ROWS. Batch-1 decode is bound by
reading the weights, so every weight byte is read once, along contiguous rows of K, with 128-bit loads.

- Grid (N tile, K split, M tile). Each program streams a BLOCK_N x K_split slab of the packed weights.
  The split count fills ~SPLIT_WAVES waves of CTAs over the SMs (a 3584-wide output is only 112 tiles of 32).
- Dequantization stays out of the inner product: int8 is symmetric per channel, so its scale multiplies
  the finished dot; an int4 tile lies inside one group (BLOCK_K <= group_size), so its contribution is
  s * (sum q x - z * sum x) - one FMA per weight, no (q - z) * s per weight. The nibbles are never
  interleaved either: x is split into its even and odd k instead (tl.split), low nibbles meet the even x,
  high nibbles the odd.
- M = 1: broadcast-multiply and row sums in fp32 (tensor cores would idle 15 of 16 rows). 2..16 rows: one
  16-row tl.dot tile, the codes converted exactly to the activation dtype (|q| <= 127).
- Merge, fused: each split writes an fp32 partial, bumps its tile's counter (CTA barrier, then an acq_rel
  atomic at gpu scope), and the program that finishes the tile sums all partials in split order (.cg
  loads: deterministic), adds the bias, stores, and resets the counter (kernels/utils.py split_counters,
  one buffer per stream: towers may run on the encoder stream while decode runs).
- swiglu: x is GLM's gate_up output [M, 2K]; silu(gate) * up (rounded to the dtype, as the separate kernel
  writes it) is formed in the x loads - the MLP's down projection needs no activation round trip.
Configs are fixed per (bits, M) - the launch runs inside CUDA-graph captures, so nothing is autotuned.
Unmeasured on a GPU so far; the kernels suite's "quant gemv" rows compare it with cuBLAS fp16 and the
bytes roofline. Eager reference: `reference_quant_linear` in quant.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import GEMV_MAX_ROWS, check_launch
from .utils import sm_count, split_counters

SPLIT_WAVES, MAX_SPLITS = 4, 32
# (bits, M tile) -> config. int4 BLOCK_K is capped at the group size by the launcher.
CONFIGS = {
    (8, 1): triton.Config({"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=2),
    (4, 1): triton.Config({"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=2),
    (8, 16): triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    (4, 16): triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
}


@triton.jit
def quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, counter_ptr, M, N, K, k_per_split,
                      stride_xm, stride_qn, stride_ym, BITS: tl.constexpr, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n, mask_m = offs_n < N, offs_m < M
    k_lo = tl.multiple_of(pid_k * k_per_split, BLOCK_K)  # whole BLOCK_K steps: 128-bit aligned weight rows
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if BITS == 8:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = _x_at(x_rows, offs_k, K, k_hi, mask_m, SWIGLU)
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < k_hi)[None, :], other=0)
            if BLOCK_M == 1:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            elif IEEE:
                acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        else:
            # int4: K is a multiple of the group size, so of BLOCK_K - whole tiles, masked along N only (a mask
            # along K would cap the vector width at what the compiler can prove of the bound)
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_rows + offs_b[None, :], mask=mask_n[:, None], other=0)
            lo, hi = packed & 15, packed >> 4
            group = k0 // GROUP  # the whole tile lies in one group
            s = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            x = _x_at(x_rows, k0 + tl.arange(0, BLOCK_K), K, k_hi, mask_m, SWIGLU)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            if BLOCK_M == 1:
                qx = tl.sum(lo.to(tl.float32) * x_even.to(tl.float32) + hi.to(tl.float32) * x_odd.to(tl.float32),
                            axis=1)[None, :]
            else:
                if IEEE:
                    qx = tl.dot(x_even, tl.trans(lo.to(tl.float32)), input_precision="ieee")
                    qx = tl.dot(x_odd, tl.trans(hi.to(tl.float32)), qx, input_precision="ieee")
                else:
                    qx = tl.dot(x_even, tl.trans(lo.to(x.dtype)))
                    qx = tl.dot(x_odd, tl.trans(hi.to(x.dtype)), qx)
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
            acc += s[None, :] * (qx - x_sum[:, None] * z[None, :])
    if BITS == 8:
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # partials [splits, M, N] in fp32
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        splits = tl.num_programs(1)
        counter = counter_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1:  # the tile's last split
            tl.store(counter, 0)  # clean for the next launch (stream-ordered after this one)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(0, splits):  # in split order: the same sum whichever program finishes last
                acc += tl.load(part_ptr + split * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            _store(acc, b_ptr, y_ptrs, offs_n, mask_n, mask, HAS_BIAS)
    else:
        _store(acc, b_ptr, y_ptrs, offs_n, mask_n, mask, HAS_BIAS)


@triton.jit
def _x_at(x_rows, offs_k, K, k_hi, mask_m, SWIGLU: tl.constexpr):
    """x [BLOCK_M, len(offs_k)] at columns offs_k (< k_hi); with SWIGLU silu(gate) * up, rounded to the dtype."""
    mask = mask_m[:, None] & (offs_k < k_hi)[None, :]
    if SWIGLU:
        gate = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_rows + K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        return (gate * tl.sigmoid(gate) * up).to(x_rows.dtype.element_ty)
    return tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _store(acc, b_ptr, y_ptrs, offs_n, mask_n, mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)


def gemv_config(bits: int, rows: int, group_size: int) -> triton.Config:
    """The fixed config of a launch: by bits and whether one row (row sums) or up to 16 (a tl.dot tile); int4
    BLOCK_K capped at the group size, BLOCK_N widened to keep the bytes a tile reads (16 per thread or more)."""
    cfg = CONFIGS[(bits, 1 if rows == 1 else 16)]
    block_k = cfg.kwargs["BLOCK_K"]
    if bits == 4 and block_k > group_size:  # a tile stays inside a group: narrower in K, as many bytes wider in N
        kw = {**cfg.kwargs, "BLOCK_N": cfg.kwargs["BLOCK_N"] * block_k // group_size, "BLOCK_K": group_size}
        cfg = triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cfg


def gemv_splits(n_tiles: int, K: int, block_k: int, device) -> tuple[int, int]:
    """(splits, k_per_split): enough programs for SPLIT_WAVES waves over the SMs, at most MAX_SPLITS, whole
    BLOCK_K steps per split and no empty split."""
    steps = triton.cdiv(K, block_k)
    want = triton.cdiv(SPLIT_WAVES * sm_count(torch.device(device)), n_tiles)
    per_split = triton.cdiv(steps, max(1, min(want, MAX_SPLITS, steps))) * block_k
    return triton.cdiv(K, per_split), per_split


def quant_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None, swiglu: bool = False,
               config: triton.Config | None = None, splits: int | None = None) -> torch.Tensor:
    """x [..., K] (or [..., 2K] gate | up with swiglu) @ dequantize(W)^T (+ bias) -> [..., N], at most
    GEMV_MAX_ROWS rows. config / splits: force a config or a split count (tests, benchmarks)."""
    bits, N, K, group, x2, out, y2 = check_launch(x, qweight, scales, zeros, bias, out, swiglu)
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"quant_gemv is for decode-sized inputs: {M} rows > GEMV_MAX_ROWS = {GEMV_MAX_ROWS}")
    if M == 0 or N == 0:
        return out
    cfg = config or gemv_config(bits, M, group)
    block_m, block_n, block_k = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if M > block_m or (bits == 4 and group % block_k):
        raise ValueError(f"config {cfg} cannot take {M} rows / group_size {group}")
    n_tiles = triton.cdiv(N, block_n)
    if splits is None:
        splits, per_split = gemv_splits(n_tiles, K, block_k, x.device)
    else:
        per_split = triton.cdiv(triton.cdiv(K, block_k), splits) * block_k
        splits = triton.cdiv(K, per_split)
    part = counters = y2  # unused by a single split
    if splits > 1:
        part = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
        counters = split_counters(x.device, n_tiles, per_stream=True)
    quant_gemv_kernel[(n_tiles, splits, 1)](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y2, part,
        counters, M, N, K, per_split, x2.stride(0), qweight.stride(0), y2.stride(0), BITS=bits, GROUP=group if bits == 4 else 1,
        HAS_BIAS=bias is not None, SWIGLU=swiglu, SPLIT=splits > 1, IEEE=x.dtype == torch.float32, **cfg.kwargs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def compile_specs():
    """Every config at the 9B decode launches it serves: the MLP down projection (gate_up [M, 2 x 13696] with
    SwiGLU fused -> 3584, split-K with the merge) and the qkv projection (3584 -> 4608, one split), with int4
    at group size 128 and 32."""
    from .specs import CompileSpec, TensorArg
    N, K = 3584, 13696
    specs = []
    for dtype in ("fp16", "bf16"):
        t, f32, i32 = TensorArg(dtype), TensorArg("fp32"), TensorArg("i32")
        for (bits, rows), cfg in CONFIGS.items():
            for group, swiglu, (n, k) in ((128, True, (N, K)), (32, False, (4608, 3584))):
                if bits == 8 and group != 128:
                    continue
                cfg_g = gemv_config(bits, rows, group)
                splits = 1 if not swiglu else 8
                per_split = triton.cdiv(triton.cdiv(k, cfg_g.kwargs["BLOCK_K"]), splits) * cfg_g.kwargs["BLOCK_K"]
                args = {"x_ptr": t, "q_ptr": TensorArg("i8" if bits == 8 else "u8"),
                        "s_ptr": f32 if bits == 8 else t, "z_ptr": TensorArg("u8") if bits == 4 else f32, "b_ptr": t,
                        "y_ptr": t, "part_ptr": f32 if splits > 1 else t, "counter_ptr": i32 if splits > 1 else t,
                        "M": 1 if rows == 1 else 7, "N": n, "K": k, "k_per_split": per_split,
                        "stride_xm": 2 * k if swiglu else k, "stride_qn": k if bits == 8 else k // 2, "stride_ym": n,
                        "BITS": bits, "GROUP": group if bits == 4 else 1, "HAS_BIAS": not swiglu, "SWIGLU": swiglu,
                        "SPLIT": splits > 1, "IEEE": False}
                kw = cfg_g.kwargs
                specs.append(CompileSpec.from_config(
                    f"quant_gemv int{bits}", quant_gemv_kernel, args, cfg_g,
                    label=f"{dtype} M{'=1' if rows == 1 else '<=16'} {'g' + str(group) + ' ' if bits == 4 else ''}"
                          f"{'swiglu split' if swiglu else 'qkv'} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} "
                          f"w{cfg_g.num_warps} s{cfg_g.num_stages}"))
    return specs
