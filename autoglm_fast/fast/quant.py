"""FastQuantLinear: QuantLinear on the Triton W8A16 / W4A16 kernels (decode-sized inputs: split-K GEMV,
larger: tiled GEMM; kernels/quant.py picks)."""
from __future__ import annotations

from torch import Tensor

from ..kernels.quant import quant_linear
from ..quant.linear import QuantLinear
from .base import FastModule


class FastQuantLinear(FastModule, QuantLinear):
    def forward(self, x: Tensor, swiglu: bool = False, out: Tensor | None = None) -> Tensor:
        """x @ dequantize()^T + bias (into `out` if given); swiglu: x is [..., 2K] (gate | up)."""
        if not self.kernels_usable(x) or x.dtype != self.dtype:
            y = QuantLinear.forward(self, x, swiglu)
            return y if out is None else out.copy_(y)
        return quant_linear(x, self.qweight, self.scales, self.zeros, self.bias, out=out, swiglu=swiglu)
