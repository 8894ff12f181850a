"""GLM-4.1V's vision 2D RoPE, in place on the packed qkv [N, 3E] of the fused qkv GEMM.

q and k (the first 2E columns, heads contiguous, head_dim D each) are rotated half-split (`rotate_half`:
channel i pairs with i + D/2) by the per-patch fp32 tables cos, sin [N, D] of
`Glm4vVisionModel.vision_rotary`, computed in fp32 and rounded once to qkv's dtype, as the reference:

    out[:D/2] = x1 * cos[:D/2] - x2 * sin[:D/2]        out[D/2:] = x2 * cos[D/2:] + x1 * sin[D/2:]

Why a separate pass and not a rotation fused into the attention kernel's tile loads: q would be free to
rotate there (loaded once per program), but K is re-read by every query block of its image, ~N/BLOCK_M
(97 at a 12,432-patch screenshot) times, and rotating it on each load would add cos/sin traffic and fp32
FMAs to the inner loop, the attention's bottleneck. Here each element of q and k is rotated once: one read
and one write of 2/3 of qkv (~0.15 GB, tens of microseconds on an H100) beside ~1 TFLOP of attention. One
program takes BLOCK_N patches and loads their cos/sin rows once for all 2 x num_heads heads.
Eager reference: `reference_vision_rope` below (autoglm_fast/families/glm4v/vision.py's math).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_shape, check_tensor, compute_dtype

ROPE_BLOCK_N, ROPE_WARPS = 16, 4  # at D=128: 16 x 64 halves, 8 fp16 (one 128-bit access) per thread


@triton.jit
def vision_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, N, stride_qkv, stride_cs, NUM_HEADS: tl.constexpr,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (rows < N)[:, None] & (offs < HALF)[None, :]
    rows = rows.to(tl.int64)
    cs = rows[:, None] * stride_cs + offs[None, :]
    cos1 = tl.load(cos_ptr + cs, mask=mask, other=0.0)
    cos2 = tl.load(cos_ptr + cs + HALF, mask=mask, other=0.0)
    sin1 = tl.load(sin_ptr + cs, mask=mask, other=0.0)
    sin2 = tl.load(sin_ptr + cs + HALF, mask=mask, other=0.0)
    base = qkv_ptr + rows[:, None] * stride_qkv + offs[None, :]
    for head in range(2 * NUM_HEADS):  # q's heads, then k's: the first 2E columns of each row
        ptrs = base + head * (2 * HALF)
        x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x1 * cos1 - x2 * sin1).to(qkv_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + HALF, (x2 * cos2 + x1 * sin2).to(qkv_ptr.dtype.element_ty), mask=mask)


def vision_rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate q and k of qkv [N, 3 * num_heads * D] in place by cos, sin [N, D] (fp32); returns qkv."""
    check_tensor("qkv", qkv, ndim=2)
    N, three_e = qkv.shape
    if not isinstance(num_heads, int) or num_heads < 1 or three_e % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {three_e} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    D = three_e // (3 * num_heads)
    if D % 2:
        raise ValueError(f"head_dim {D} must be even (half-split rotation)")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=(torch.float32,))
        check_shape(name, t, (N, D))
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}")
    if cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must have the same strides, got {cos.stride()} and {sin.stride()}")
    if N:
        vision_rope_kernel[(triton.cdiv(N, ROPE_BLOCK_N),)](
            qkv, cos, sin, N, qkv.stride(0), cos.stride(0), NUM_HEADS=num_heads, HALF=D // 2,
            BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_N=ROPE_BLOCK_N, num_warps=ROPE_WARPS)
    return qkv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_vision_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Eager (out of place): `apply_rotary_vision` on q and k, in compute_dtype (fp32; fp64 for fp64 inputs)."""
    N = qkv.shape[0]
    q, k, v = qkv.view(N, 3, num_heads, -1).unbind(1)
    dt = compute_dtype(qkv.dtype)
    cos, sin = cos[:, None].to(dt), sin[:, None].to(dt)
    q, k = ((t.to(dt) * cos + _rotate_half(t.to(dt)) * sin).to(qkv.dtype) for t in (q, k))
    return torch.stack((q, k, v), dim=1).reshape(N, -1)


def compile_specs():
    """The launch at GLM-4.1V's tower (12 heads x 128, qkv [N, 4608]) for one 1080x2400 screenshot
    (N = 12,432 patches), fp16 and bf16."""
    from .specs import CompileSpec, TensorArg
    N, heads, head_dim = 12_432, 12, 128
    specs = []
    for dtype in ("fp16", "bf16"):
        args = {"qkv_ptr": TensorArg(dtype), "cos_ptr": TensorArg("fp32"), "sin_ptr": TensorArg("fp32"), "N": N,
                "stride_qkv": 3 * heads * head_dim, "stride_cs": head_dim, "NUM_HEADS": heads,
                "HALF": head_dim // 2, "BLOCK_HALF": head_dim // 2, "BLOCK_N": ROPE_BLOCK_N}
        specs.append(CompileSpec("vision_rope", vision_rope_kernel, args, num_warps=ROPE_WARPS,
                                 label=f"{dtype} N={N} {heads}x{head_dim} rows {ROPE_BLOCK_N} w{ROPE_WARPS}"))
    return specs
