"""FastGatedFusion: the gated three-way fusion as one row kernel (plus a per-sequence summary for
prefill). Reference: autoglm_fast/reference/fusion.py."""
from __future__ import annotations

import torch

from ..kernels.gated_fusion import gated_fusion
from ..reference.fusion import GatedFusion
from .base import FastModule


class FastGatedFusion(FastModule, GatedFusion):
    def forward(self, t: torch.Tensor, v: torch.Tensor | None = None, a: torch.Tensor | None = None,
                has_v: torch.Tensor | None = None, has_a: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kernels_usable(t):
            return GatedFusion.forward(self, t, v, a, has_v, has_a)
        return gated_fusion(t, self.gate.weight, self.gate.bias, v, a, has_v, has_a)
