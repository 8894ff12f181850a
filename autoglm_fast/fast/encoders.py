"""Fast attention for the seed model's encoders: CLIP's and Whisper's q/k/v projections as one GEMM.

    FastCLIPAttention     one qkv GEMM (bias fused) -> SDPA (flash on CUDA) -> out-projection
    FastWhisperAttention  the same; the key projection has no bias (zeros in the fused bias), and q is
                          scaled after its projection, before the dot products, as the reference does

References beside them: autoglm_fast/reference/clip.py, autoglm_fast/reference/whisper.py. GLM-4.1V's
vision tower has one qkv projection already (families/glm4v/fast.py).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..reference.clip import CLIPAttention
from ..reference.whisper import WhisperAttention
from .base import FastModule
from .quant import fuse_projections, linear


class _FusedQKV(FastModule):
    @classmethod
    def from_reference(cls, ref):
        fast = super().from_reference(ref)
        weight, bias = fuse_projections(fast.q_proj, fast.k_proj, fast.v_proj)
        if isinstance(weight, nn.Module):
            fast.qkv_weight = weight  # quantized towers: the fused layer (its buffers stay out of the state dict)
        else:
            fast.register_buffer("qkv_weight", weight, persistent=False)
        fast.register_buffer("qkv_bias", bias, persistent=False)
        return fast

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[n, t, d] -> q, k, v [n, heads, t, head_dim] from one GEMM."""
        n, t, _ = x.shape
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(n, t, 3, self.num_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _out(self, y: Tensor) -> Tensor:
        n, _, t, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(n, t, -1))


class FastCLIPAttention(_FusedQKV, CLIPAttention):
    def forward(self, x: Tensor) -> Tensor:
        if not self.kernels_usable(x):
            return CLIPAttention.forward(self, x)
        q, k, v = self._qkv(x)
        return self._out(F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5))


class FastWhisperAttention(_FusedQKV, WhisperAttention):
    def forward(self, x: Tensor) -> Tensor:
        if not self.kernels_usable(x):
            return WhisperAttention.forward(self, x)
        q, k, v = self._qkv(x)
        return self._out(F.scaled_dot_product_attention(q * self.head_dim**-0.5, k, v, scale=1.0))
