"""`QuantLinear`: an nn.Linear whose weight is stored weight-only quantized (int8 per channel, or int4 in
groups with zero points: the formats of kernels/quant.py).

The reference forward dequantizes and runs F.linear; `FastQuantLinear` (fast/quant.py) runs the Triton
GEMV / GEMM on the packed weight. Its tensors are buffers (qweight, scales, zeros) beside the usual `bias`
parameter, so a quantized model moves, saves and counts bytes like any module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.quant import dequantize, quantize_int4, quantize_int8, reference_quant_linear, weight_format

BITS = (8, 4)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int = 128, dtype: torch.dtype | None = None, device=None, persistent: bool = True):
        """Empty quantized storage for a [out_features, in_features] weight (fill with `from_linear` /
        `from_quantized`). dtype: the activations' (bias and int4 scales). persistent=False keeps the
        buffers out of the state dict (a fused view of layers that save their own). int4 with in_features
        not a multiple of group_size (tiny models, odd tower widths) stores zero columns up to the next
        multiple (`packed_in`); the forward pads x with zeros to match."""
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else group_size
        self.packed_in = in_features if bits == 8 else -(-in_features // group_size) * group_size
        if bits == 8:
            shapes = {"qweight": ((out_features, in_features), torch.int8), "scales": ((1, out_features), torch.float32)}
        else:
            groups = self.packed_in // group_size
            shapes = {"qweight": ((out_features, self.packed_in // 2), torch.uint8),
                      "scales": ((groups, out_features), dtype), "zeros": ((groups, out_features), torch.uint8)}
        for name, (shape, dt) in shapes.items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device), persistent=persistent)
        if bits == 8:
            self.zeros = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qweight: Tensor, scales: Tensor, zeros: Tensor | None = None,
                       bias: Tensor | nn.Parameter | None = None, persistent: bool = True,
                       in_features: int | None = None) -> "QuantLinear":
        """Wrap packed tensors as they are (no copy); the format is checked. in_features: the real input
        width where the packed weight carries zero columns past it (int4, default: none)."""
        bits, N, K, group = weight_format(qweight, scales, zeros)
        in_features = K if in_features is None else in_features
        if not K - (group if bits == 4 else 1) < in_features <= K:
            raise ValueError(f"in_features={in_features} does not fit a packed weight {K} wide (group_size {group})")
        with torch.device("meta"):
            layer = cls(in_features, N, bias=False, bits=bits, group_size=group, dtype=scales.dtype,
                        persistent=persistent)
        layer.qweight, layer.scales, layer.zeros = qweight, scales, zeros
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> "QuantLinear":
        """Round-to-nearest quantization of `linear`'s weight, on its device; the bias (if any) is kept as is."""
        w = linear.weight
        if bits == 8:
            packed = quantize_int8(w) + (None,)
        elif bits == 4:  # zero columns quantize to their group's zero point: exactly 0 once dequantized
            packed = quantize_int4(F.pad(w, (0, -w.shape[1] % group_size)), group_size)
        else:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        return cls.from_quantized(*packed, bias=linear.bias, in_features=w.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out_features, in_features] weight this layer stands for."""
        return dequantize(self.qweight, self.scales, self.zeros, dtype)[:, :self.in_features]

    def forward(self, x: Tensor, swiglu: bool = False) -> Tensor:
        """y = x @ dequantize()^T + bias; swiglu: x is [..., 2K] (gate | up) and the layer reads silu(gate) * up."""
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = up * F.silu(gate)
        return reference_quant_linear(self.pad(x), self.qweight, self.scales, self.zeros, self.bias)

    def pad(self, x: Tensor) -> Tensor:
        """x with zero columns up to the packed width (a copy only where the layer has padding)."""
        return x if self.packed_in == self.in_features else F.pad(x, (0, self.packed_in - self.in_features))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}{group}")


def fuse_quant_linears(*layers: QuantLinear) -> QuantLinear:
    """One bias-free QuantLinear over the concatenated outputs of layers that read the same input (q, k, v).
    Each layer's packed weight becomes a view into the fused one, so no weight is held twice and the state
    dict is unchanged (the fused layer's buffers are not persistent). Scales and zero points are [groups, N]:
    a layer's columns would not be a contiguous view, so the fused layer holds its own copy (~1.5 % of int4)."""
    first = layers[0]
    if any((l.bits, l.group_size, l.in_features) != (first.bits, first.group_size, first.in_features) for l in layers):
        raise ValueError("fused QuantLinears must share bits, group_size and in_features")
    qweight = torch.cat([l.qweight for l in layers])
    scales = torch.cat([l.scales for l in layers], dim=1)
    zeros = None if first.zeros is None else torch.cat([l.zeros for l in layers], dim=1)
    start = 0
    for l in layers:
        l.qweight = qweight[start:start + l.out_features]
        start += l.out_features
    return QuantLinear.from_quantized(qweight, scales, zeros, persistent=False, in_features=first.in_features)
