"""GLM's MLP down projection with SwiGLU fused into its input: y = (silu(gate) * up) @ W_down^T.

The gate_up GEMM output [M, 2I] (gate | up) is read by the down GEMM's A-tile loads, which apply
silu(gate) * up in fp32 and round it to the dtype (as the separate `norms.swiglu` writes it) before the
dot: no [M, I] activation round trip and one launch fewer per layer. For decode-sized M only
(`MAX_ROWS`): there the GEMM streams the weight and the activation is tiny, while at prefill sizes
cuBLAS plus the one-pass `swiglu` kernel is the better pair (FastGlmMLP picks). Configs are fixed per
M bucket, never autotuned: the launch runs inside CUDA-graph captures. Unmeasured on a GPU so far;
the kernels suite's "mlp down" rows compare it with cuBLAS + swiglu.
Eager reference: `reference_swiglu_down`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import as_rows, check_tensor, compute_dtype

MAX_ROWS = 64
# (max rows, config): small N tiles so even a 3584-wide output spreads over ~a wave of CTAs, deep K tiles
# in flight because each CTA streams N_tile x I of the weight.
CONFIGS = [
    (16, triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4)),
    (MAX_ROWS, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3)),
]


@triton.jit
def swiglu_down_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    gate_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # up is K columns on
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_left)
        gate = tl.load(gate_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        up = tl.load(gate_ptrs + K, mask=a_mask, other=0.0).to(tl.float32)
        a = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        gate_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


def _config(rows: int) -> triton.Config:
    return next(cfg for limit, cfg in CONFIGS if rows <= limit)


def swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate | up), weight [N, I] -> (silu(gate) * up) @ weight^T, [..., N]; at most
    MAX_ROWS rows (decode steps)."""
    check_tensor("gate_up", gate_up)
    check_tensor("weight", weight, ndim=2, like=gate_up)
    N, I = weight.shape
    if gate_up.dim() == 0 or gate_up.shape[-1] != 2 * I:
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}; its last dimension must be 2 * weight's "
                         f"in_features = {2 * I}")
    x2 = as_rows("gate_up", gate_up, 2 * I)
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"swiglu_down is for decode-sized inputs: {M} rows > MAX_ROWS = {MAX_ROWS}")
    shape = (*gate_up.shape[:-1], N)
    if out is None:
        out = torch.empty(shape, device=gate_up.device, dtype=gate_up.dtype)
    check_tensor("out", out, like=gate_up)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    y2 = as_rows("out", out, N)
    if M == 0 or N == 0:
        return out
    cfg = _config(M)
    grid = (triton.cdiv(N, cfg.kwargs["BLOCK_N"]), triton.cdiv(M, cfg.kwargs["BLOCK_M"]))
    swiglu_down_kernel[grid](x2, weight, y2, M, N, I, x2.stride(0), weight.stride(0), y2.stride(0),
                             IEEE=gate_up.dtype == torch.float32, **cfg.kwargs, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages)
    return out


def reference_swiglu_down(gate_up, weight):
    """Eager GlmMLP after its gate_up projection: down_proj(up * silu(gate)), the activation in the dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = up * F.silu(gate)
    c = compute_dtype(gate_up.dtype)
    return F.linear(act.to(c), weight.to(c)).to(gate_up.dtype)


def compile_specs():
    """Each config at a decode launch it serves (batch 1, batch 33) of gate_up [M, 2 x 26880] -> [M, 3584]."""
    from .specs import CompileSpec, TensorArg
    N, K = 3584, 26880
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        for rows, cfg in CONFIGS:
            args = {"x_ptr": t, "w_ptr": t, "y_ptr": t, "M": 1 if rows == 16 else 33, "N": N, "K": K, "stride_xm": 2 * K, "stride_wn": K,
                    "stride_ym": N, "IEEE": False}
            kw = cfg.kwargs
            specs.append(CompileSpec.from_config(
                "swiglu_down", swiglu_down_kernel, args, cfg,
                label=f"{dtype} M<={rows} {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} "
                      f"s{cfg.num_stages}"))
    return specs
