"""Weight-only quantized linear layers: the formats, round-to-nearest quantization, the eager reference
(dequantize, then F.linear) and `quant_linear`, which picks the kernel for a launch.

Formats (W is the nn.Linear weight, [N = out_features, K = in_features]):
    int8  qweight int8 [N, K], symmetric: W = q * s; scales fp32 [1, N] (one per output channel).
    int4  qweight uint8 [N, K / 2], two weights per byte along K: byte j holds k = 2j in its low nibble and
          k = 2j + 1 in its high one. Asymmetric per group of `group_size` consecutive k:
          W = (q - z) * s, q and z in [0, 15]; scales [K / G, N] (the model's dtype), zeros uint8 [K / G, N].
Scales and zeros are group-major ([groups, N], as AWQ and GPTQ keep them), so a tile of output channels
reads its scales in one coalesced row. Rows of K stay contiguous: the decode GEMV streams each output
channel's weights with 128-bit loads. The quantizers round to nearest exactly as AutoAWQ's
`pseudo_quantize_tensor` does (min/max per group, zero point rounded), so an AWQ checkpoint repacked into
this layout (autoglm_fast/quant/awq.py) runs on the same kernels.

Kernels: M <= GEMV_MAX_ROWS (decode) -> quant_gemv.py (split-K GEMV, dequantize in registers); larger M
(prefill) -> quant_gemm.py (tiled GEMM, dequantize a tile before tl.dot).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import as_rows, check_shape, check_tensor, compute_dtype

GROUP_SIZES = (32, 64, 128)
GEMV_MAX_ROWS = 16


# ---- formats -----------------------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (qweight int8 [N, K], scales fp32 [1, N]): symmetric per output channel, round to nearest."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-10) / 127.0
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales[None]


def quantize_int4(weight: torch.Tensor, group_size: int = 128,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (qweight uint8 [N, K/2], scales [K/G, N] in scale_dtype (default W's), zeros uint8 [K/G, N]):
    asymmetric min/max per group of group_size along K, round to nearest (AutoAWQ's formula). The codes are
    computed with the scales as stored, so dequantization reproduces them exactly."""
    N, K = weight.shape
    check_group_size(group_size, K)
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo).clamp(min=1e-5) / 15.0).to(scale_dtype or weight.dtype).float()
    zeros = torch.round(-lo / scales).clamp_(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return pack_int4(q), scales.t().contiguous().to(scale_dtype or weight.dtype), zeros.t().to(torch.uint8).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in [0, 15] -> uint8 [N, K/2]: k = 2j in the low nibble of byte j, k = 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K] (pack_int4's inverse)."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def check_group_size(group_size: int, in_features: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")


def weight_format(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(bits, out_features N, in_features K, group_size) of a quantized weight, checked (ValueError/TypeError
    naming the tensor that does not fit)."""
    for name, t in (("qweight", qweight), ("scales", scales)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not scales.is_floating_point():
        raise TypeError(f"scales must be floating point, got {scales.dtype}")
    if qweight.dtype == torch.int8:
        N, K = qweight.shape
        if tuple(scales.shape) != (1, N):
            raise ValueError(f"int8 scales must have shape (1, {N}) (one per output channel), got {tuple(scales.shape)}")
        if zeros is not None:
            raise ValueError("int8 weights are symmetric: zeros must be None")
        return 8, N, K, K
    if qweight.dtype != torch.uint8:
        raise TypeError(f"qweight must be int8 (int8 weights) or uint8 (two int4 weights per byte), got {qweight.dtype}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    groups = scales.shape[0]
    if scales.shape[1] != N or groups == 0 or K % groups:
        raise ValueError(f"int4 scales must have shape (K / group_size, {N}) with K={K}, got {tuple(scales.shape)}")
    if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"int4 zeros must be a uint8 tensor shaped like scales {tuple(scales.shape)}, got "
                         f"{getattr(zeros, 'dtype', None)} {tuple(getattr(zeros, 'shape', ()))}")
    check_group_size(K // groups, K)
    return 4, N, K, K // groups


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] a quantized one stands for, computed in fp32 and cast to dtype."""
    bits, N, K, group = weight_format(qweight, scales, zeros)
    s = scales.float()
    if bits == 8:
        return (qweight.float() * s.t()).to(dtype)
    q = unpack_int4(qweight).float().reshape(N, K // group, group)
    w = (q - zeros.t().float()[..., None]) * s.t()[..., None]
    return w.reshape(N, K).to(dtype)


# ---- the linear --------------------------------------------------------------------------------------------
def check_launch(x, qweight, scales, zeros, bias, out, swiglu: bool = False):
    """The launchers' shared checks (TypeError / ValueError naming the argument) -> (bits, N, K, group_size,
    x as [M, K] rows (2K with swiglu), out (allocated if None), out as [M, N] rows)."""
    check_tensor("x", x)
    bits, N, K, group = weight_format(qweight, scales, zeros)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None:
            check_tensor(name, t, dtypes=None, like=x)
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    width = 2 * K if swiglu else K
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be {width} "
                         f"({'2 x ' if swiglu else ''}the weight's in_features K={K})")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=x)
        check_shape("bias", bias, (N,))
    shape = (*x.shape[:-1], N)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    check_tensor("out", out, like=x)
    check_shape("out", out, shape)
    return bits, N, K, group, as_rows("x", x, width), out, as_rows("out", out, N)



def reference_quant_linear(x, qweight, scales, zeros=None, bias=None, swiglu: bool = False):
    """Eager `quant_linear`, as a user would write it: dequantize to x's dtype, then F.linear (accumulated in
    fp32, fp64 for fp64 x) and cast back. swiglu: x is [..., 2K] (gate | up) and the GEMM reads
    silu(gate) * up, rounded to x's dtype first."""
    if swiglu:
        gate, up = x.chunk(2, dim=-1)
        x = up * F.silu(gate)
    c = compute_dtype(x.dtype)
    w = dequantize(qweight, scales, zeros, x.dtype)
    return F.linear(x.to(c), w.to(c), None if bias is None else bias.to(c)).to(x.dtype)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                 swiglu: bool = False) -> torch.Tensor:
    """x [..., K] @ dequantize(qweight, scales, zeros)^T (+ bias) -> [..., N] in x's dtype, into `out` if given.
    Decode-sized inputs (<= GEMV_MAX_ROWS rows) run the split-K GEMV, larger ones the tiled GEMM.
    swiglu (GEMV only): x is [..., 2K] (gate | up) and the weights multiply silu(gate) * up."""
    from .quant_gemm import quant_gemm
    from .quant_gemv import quant_gemv
    rows = x.numel() // max(1, x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0
    if swiglu or rows <= GEMV_MAX_ROWS:
        return quant_gemv(x, qweight, scales, zeros, bias, out=out, swiglu=swiglu)
    return quant_gemm(x, qweight, scales, zeros, bias, out=out)
