"""RMSNorm with an optional fused residual add, and the SwiGLU activation of GLM's MLP.

rms_norm: one program per row reads x (and the residual), writes s = x + residual once (rounded to
the dtype, as the reference's add is) and y = weight * rmsnorm(s) with the reference's roundings:
normalize in fp32, cast to the dtype, then the weight multiply rounded to the dtype.
swiglu: out = silu(gate) * up from the fused gate_up projection [..., 2I] in one pass, in fp32.
Eager references: `reference_rms_norm`, `reference_swiglu` (autoglm_fast/reference/glm.py's math).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import as_rows, check_shape, check_tensor, compute_dtype

SWIGLU_BLOCK = 1024


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, r_ptr, s_ptr, pw_ptr, H, eps, pre_eps, stride_x, stride_y, stride_r,
                    stride_s, HAS_RESIDUAL: tl.constexpr, PRE_NORM: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    if PRE_NORM:  # a sandwich norm on x before the add (GLM-4.1V's post_*_layernorm), rounded as the reference
        pre = (x * tl.rsqrt(tl.sum(x * x) / H + pre_eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
        pw = tl.load(pw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        x = (pw * pre).to(y_ptr.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the dtype first: the reference adds in the dtype and normalizes the rounded sum.
        # The whole row is in registers before the store, so s_ptr may alias r_ptr (in-place residual).
        s = (x + tl.load(r_ptr + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * stride_s + offs, s, mask=m)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x) / H + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight, as HF does
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def swiglu_kernel(x_ptr, y_ptr, I, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=m)


def _norm_warps(block_h: int) -> int:
    return min(16, max(1, block_h // 512))  # ~16 fp32 values of the row per thread


def _rows_like(name: str, t, x: torch.Tensor) -> torch.Tensor:
    check_tensor(name, t, like=x)
    check_shape(name, t, tuple(x.shape))
    return as_rows(name, t, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None,
             pre_weight: torch.Tensor | None = None, pre_eps: float | None = None):
    """x [..., H], weight [H] -> y; with a residual -> (y, residual_out) where residual_out = x + residual
    (a new tensor unless given; passing `residual` itself updates it in place) and y = rmsnorm of it.
    pre_weight (with a residual): x is first normed by its own RMSNorm (pre_weight, pre_eps), so
    residual_out = rmsnorm_pre(x) + residual - a sandwich norm, the add and the next norm in one pass."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    H = x.shape[-1]
    check_tensor("weight", weight, ndim=1, like=x)
    check_shape("weight", weight, (H,))
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if residual is None and residual_out is not None:
        raise ValueError("residual_out was given without a residual")
    if pre_weight is not None:
        if residual is None:
            raise ValueError("pre_weight was given without a residual")
        check_tensor("pre_weight", pre_weight, ndim=1, like=x)
        check_shape("pre_weight", pre_weight, (H,))
        if not isinstance(pre_eps, (int, float)) or pre_eps < 0:
            raise ValueError(f"pre_eps must be a non-negative float with pre_weight, got {pre_eps!r}")
    x2 = as_rows("x", x, H)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    y2 = _rows_like("out", out, x)
    r2 = s2 = x2
    if residual is not None:
        r2 = _rows_like("residual", residual, x)
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        s2 = _rows_like("residual_out", residual_out, x)
    if x2.shape[0] and H:
        block_h = triton.next_power_of_2(H)
        rms_norm_kernel[(x2.shape[0],)](x2, weight, y2, r2, s2, weight if pre_weight is None else pre_weight, H,
                                        float(eps), float(pre_eps or 0.0), x2.stride(0), y2.stride(0), r2.stride(0),
                                        s2.stride(0), HAS_RESIDUAL=residual is not None,
                                        PRE_NORM=pre_weight is not None, BLOCK_H=block_h,
                                        num_warps=_norm_warps(block_h))
    return out if residual is None else (out, residual_out)


def swiglu(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
    check_tensor("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [..., 2 * I], got shape {tuple(gate_up.shape)}")
    I = gate_up.shape[-1] // 2
    x2 = as_rows("gate_up", gate_up, 2 * I)
    shape = (*gate_up.shape[:-1], I)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    check_tensor("out", out, like=gate_up)
    check_shape("out", out, shape)
    y2 = as_rows("out", out, I)
    if x2.shape[0] and I:
        block = min(SWIGLU_BLOCK, triton.next_power_of_2(I))
        swiglu_kernel[(x2.shape[0], triton.cdiv(I, block))](x2, y2, I, x2.stride(0), y2.stride(0), BLOCK=block,
                                                            num_warps=4 if block >= 512 else 1)
    return out


def reference_rms_norm(x, weight, eps, residual=None, pre_weight=None, pre_eps=None):
    """Eager RMSNorm of autoglm_fast/reference/glm.py, after the decoder layer's `residual + h` add
    (h = x, or its own RMSNorm with pre_weight: the sandwich norm of GLM-4.1V's layers)."""
    def norm(v, w, e):
        v32 = v.to(compute_dtype(v.dtype))
        return w * (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + e)).to(v.dtype)
    if pre_weight is not None:
        x = norm(x, pre_weight, pre_eps)
    s = x if residual is None else residual + x
    y = norm(s, weight, eps)
    return y if residual is None else (y, s)


def reference_swiglu(gate_up):
    """GlmMLP's activation: up * silu(gate), gate = first half of the gate_up_proj output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * F.silu(gate)


def compile_specs():
    """The launches at GLM-4-9B's shapes (hidden 3584, intermediate 26880), contiguous rows (compile matrix)."""
    from .specs import CompileSpec, TensorArg
    hidden, intermediate = 3584, 26880
    block_h = triton.next_power_of_2(hidden)
    block = min(SWIGLU_BLOCK, triton.next_power_of_2(intermediate))
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        rows = {"x_ptr": t, "w_ptr": t, "y_ptr": t, "r_ptr": t, "s_ptr": t, "pw_ptr": t, "H": hidden, "eps": 1e-5,
                "pre_eps": 1e-5, **{s: hidden for s in ("stride_x", "stride_y", "stride_r", "stride_s")},
                "BLOCK_H": block_h}
        for res, pre, name in ((False, False, "plain"), (True, False, "+residual"), (True, True, "pre-norm+residual")):
            specs.append(CompileSpec("rms_norm", rms_norm_kernel, {**rows, "HAS_RESIDUAL": res, "PRE_NORM": pre},
                                     num_warps=_norm_warps(block_h),
                                     label=f"{dtype} H={hidden} {name} w{_norm_warps(block_h)}"))
        args = {"x_ptr": t, "y_ptr": t, "I": intermediate, "stride_x": 2 * intermediate, "stride_y": intermediate,
                "BLOCK": block}
        specs.append(CompileSpec("swiglu", swiglu_kernel, args, num_warps=4,
                                 label=f"{dtype} I={intermediate} block {block} w4"))
    return specs
