"""FastQuantLinear: QuantLinear on the Triton W8A16 / W4A16 kernels (decode-sized inputs: split-K GEMV,
larger: tiled GEMM; kernels/quant.py picks), and the two helpers that let every fast module take
full-precision and quantized projections alike: `linear` and `fuse_projections`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.norms import swiglu as swiglu_act
from ..kernels.quant import quant_linear
from ..quant.linear import QuantLinear, fuse_quant_linears
from .base import FastModule, fuse_bias, fuse_linears


class FastQuantLinear(FastModule, QuantLinear):
    def forward(self, x: Tensor, swiglu: bool = False, out: Tensor | None = None) -> Tensor:
        """x @ dequantize()^T + bias (into `out` if given); swiglu: x is [..., 2K] (gate | up)."""
        if not self.kernels_usable(x):
            y = QuantLinear.forward(self, x, swiglu)
            return y if out is None else out.copy_(y)
        if self.packed_in != self.in_features:  # zero-padded int4 columns: x padded to match
            x = self.pad(swiglu_act(x) if swiglu else x)
            swiglu = False
        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, out=out, swiglu=swiglu)


def linear(x: Tensor, weight: Tensor | nn.Module, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """x @ W^T (+ bias), into `out` if given, for a weight tensor or an nn.Linear (cuBLAS) or a QuantLinear (its
    kernels; a QuantLinear brings its own bias)."""
    if isinstance(weight, QuantLinear):
        if isinstance(weight, FastQuantLinear):
            return weight(x, out=out)
        y = weight(x)
        return y if out is None else out.copy_(y)
    if isinstance(weight, nn.Linear):
        weight, bias = weight.weight, weight.bias
    if out is None:
        return F.linear(x, weight, bias)
    out = torch.matmul(x, weight.t(), out=out)
    return out if bias is None else out.add_(bias)


def fuse_projections(*layers: nn.Module) -> tuple[Tensor | FastQuantLinear, Tensor | None]:
    """(fused weight, fused bias) for projections that read the same input: one GEMM instead of several.
    nn.Linears give a weight tensor (base.fuse_linears); QuantLinears a FastQuantLinear over their packed
    weights, without the bias (returned apart, as for Linears). Either way the layers' own tensors become
    views into the fused ones, so the state dict is unchanged and nothing is held twice."""
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        if any(isinstance(layer, QuantLinear) for layer in layers):
            raise TypeError("cannot fuse quantized and full-precision projections into one GEMM")
        return fuse_linears(*layers)
    bias = fuse_bias(layers, next((l.bias.dtype for l in layers if l.bias is not None), None), layers[0].qweight.device)
    return FastQuantLinear.from_reference(fuse_quant_linears(*layers)), bias
