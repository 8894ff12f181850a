"""`y = epilogue(x @ W^T + b)`: one GEMM with the adapter's epilogues fused, so the GEMM output never
makes a round trip through memory before its elementwise / row-wise follow-up.

Epilogues:
    NONE       y = x W^T + b
    GELU       y = gelu(x W^T + b)            exact erf GELU, as nn.GELU()
    RESIDUAL   y = r + (x W^T + b)            the adapter's `h + ffn(...)`
    LAYERNORM  y = LayerNorm(x W^T + b)       the whole output row sits in one tile (N <= 1024)
Eager reference: `reference_linear` below. fp16/bf16/fp32 in, fp32 accumulate, output in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import as_rows, autotune, check_shape, check_tensor, compute_dtype

NONE, GELU, RESIDUAL, LAYERNORM = 0, 1, 2, 3
EPILOGUES = {"none": NONE, "gelu": GELU, "residual": RESIDUAL, "layernorm": LAYERNORM}
MAX_LN_WIDTH = 1024  # LayerNorm needs the full row in registers

# Every config fits the smallest shared memory we target (sm_89, 99 KB) at the widest LN tile.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]  # (16x64x64 was dropped: Triton 3.6's sm_90 build of it spills)
LN_CONFIGS = [  # BLOCK_N is the whole row, set by the launcher
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
]


@triton.jit
def _linear_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, offs_m, offs_n, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of x @ W^T (W is [N, K], row-major)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _epilogue_store(acc, b_ptr, r_ptr, y_ptr, M, N, stride_rm, stride_ym, offs_m, offs_n,
                    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr):
    mask_n = offs_n < N
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # GELU
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if EPILOGUE == 2:  # RESIDUAL
        r = tl.load(r_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += r.to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def linear_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_rm,
                  stride_ym, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _linear_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K,
                       IEEE)
    _epilogue_store(acc, b_ptr, r_ptr, y_ptr, M, N, stride_rm, stride_ym, offs_m, offs_n, HAS_BIAS, EPILOGUE)


@autotune(LN_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def linear_layernorm_kernel(x_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm,
                            stride_wn, stride_ym, eps, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)  # the whole row
    mask_n = offs_n < N
    acc = _linear_tile(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, offs_m, offs_n, BLOCK_M, BLOCK_N, BLOCK_K,
                       IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # Padding columns are exactly 0 (masked loads), so they drop out of the mean; mask them for the variance.
    mean = tl.sum(acc, axis=1) / N
    diff = tl.where(mask_n[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    lnw = tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * lnw[None, :] + lnb[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)


def _m_bucket(m: int) -> int:
    """Autotune key for the row count: powers of two, so ragged batches don't retune on every shape."""
    return min(triton.next_power_of_2(m), 8192)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 epilogue: str = "none", residual: torch.Tensor | None = None,
                 ln_weight: torch.Tensor | None = None, ln_bias: torch.Tensor | None = None,
                 eps: float = 1e-5, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias[N]) with `epilogue` fused; returns [..., N] in x's dtype."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {sorted(EPILOGUES)}, got {epilogue!r}")
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2, like=x)
    N, K = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be weight's K={K}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=x)
        check_shape("bias", bias, (N,))
    lead = x.shape[:-1]
    x2 = as_rows("x", x, K)
    M = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, N, device=x.device, dtype=x.dtype)
    check_tensor("out", out, like=x)
    check_shape("out", out, (*lead, N))
    y2 = as_rows("out", out, N)
    ieee = x.dtype == torch.float32
    if M == 0:
        return out
    if epilogue == "layernorm":
        if ln_weight is None or ln_bias is None:
            raise ValueError("epilogue='layernorm' needs ln_weight and ln_bias")
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
            check_tensor(name, t, ndim=1, like=x)
            check_shape(name, t, (N,))
        if N > MAX_LN_WIDTH:
            raise ValueError(f"epilogue='layernorm' keeps the whole row in one tile: N={N} > {MAX_LN_WIDTH}")
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
        linear_layernorm_kernel[grid](x2, weight, bias if bias is not None else weight, ln_weight, ln_bias, y2,
                                      M, N, K, _m_bucket(M), x2.stride(0), weight.stride(0), y2.stride(0), eps,
                                      HAS_BIAS=bias is not None, IEEE=ieee,
                                      BLOCK_N=max(16, triton.next_power_of_2(N)))
        return out
    r2 = y2
    if epilogue == "residual":
        if residual is None:
            raise ValueError("epilogue='residual' needs residual")
        check_tensor("residual", residual, like=x)
        check_shape("residual", residual, (*lead, N))
        r2 = as_rows("residual", residual, N)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    linear_kernel[grid](x2, weight, bias if bias is not None else weight, r2, y2, M, N, K, _m_bucket(M),
                        x2.stride(0), weight.stride(0), r2.stride(0), y2.stride(0),
                        HAS_BIAS=bias is not None, EPILOGUE=EPILOGUES[epilogue], IEEE=ieee)
    return out


def reference_linear(x, weight, bias=None, *, epilogue="none", residual=None, ln_weight=None, ln_bias=None,
                     eps=1e-5):
    """Eager PyTorch of `fused_linear`, computed in fp32 and cast back like the kernel."""
    c = compute_dtype(x.dtype)
    y = torch.nn.functional.linear(x.to(c), weight.to(c), None if bias is None else bias.to(c))
    if epilogue == "gelu":
        y = torch.nn.functional.gelu(y)
    elif epilogue == "residual":
        y = y + residual.to(c)
    elif epilogue == "layernorm":
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), ln_weight.to(c), ln_bias.to(c), eps)
    return y.to(x.dtype)


def compile_specs():
    """Every config the launchers can pick, at the vision adapter's real launches (compile matrix): 257 tokens,
    proj 1024->512 (+LayerNorm), FFN 512->2048 (+GELU) and 2048->512 (+residual), contiguous rows. The audio
    adapter (384->512, up to 375 tokens) specializes the same: every width is a multiple of 16, M is not."""
    from .specs import CompileSpec, TensorArg
    M, shapes = 257, {"gelu": (2048, 512), "residual": (512, 2048), "layernorm": (512, 1024)}  # (N, K)
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        rows = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "y_ptr": t, "M": M, "M_BUCKET": triton.next_power_of_2(M),
                "HAS_BIAS": True, "IEEE": False}
        for epi in ("gelu", "residual"):
            N, K = shapes[epi]
            args = {**rows, "r_ptr": t, "N": N, "K": K, "stride_xm": K, "stride_wn": K, "stride_rm": N,
                    "stride_ym": N, "EPILOGUE": EPILOGUES[epi]}
            for cfg in GEMM_CONFIGS:
                specs.append(CompileSpec.from_config(
                    f"linear+{epi}", linear_kernel, args, cfg,
                    label=f"{dtype} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} "
                          f"w{cfg.num_warps} s{cfg.num_stages}"))
        N, K = shapes["layernorm"]
        args = {**rows, "lnw_ptr": t, "lnb_ptr": t, "N": N, "K": K, "stride_xm": K, "stride_wn": K, "stride_ym": N,
                "eps": 1e-5, "BLOCK_N": triton.next_power_of_2(N)}
        for cfg in LN_CONFIGS:
            specs.append(CompileSpec.from_config(
                "linear+layernorm", linear_layernorm_kernel, args, cfg,
                label=f"{dtype} {cfg.kwargs['BLOCK_M']}x{N}x{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} "
                      f"s{cfg.num_stages}"))
    return specs
