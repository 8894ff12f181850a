"""Fast GLM-4.1V vision tower: drop-in twins of vision.py's block layers on Triton kernels.

    FastGlm4vVisionAttention  qkv GEMM (cuBLAS) -> 2D RoPE on q, k in place (vision_rope_) -> varlen
                              non-causal flash attention over the packed images (varlen_attention,
                              the adapter's kernel) -> out-projection GEMM (cuBLAS)
    FastGlm4VisionMlp         one gate|up GEMM -> SwiGLU (one pass, fp32 inside) -> down GEMM
    FastGlm4vVisionBlock      the block wiring, with the post-attention residual add fused into norm2

The blocks' RMSNorms are the text model's class (reference/glm.py), swapped to FastRMSNorm by the same
table. Patch embedding, the position resample, downsample and merger run once per tower on 1/depth
(or a quarter) of the work and stay eager.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...fast.base import FastModule
from ...fast.quant import fuse_projections, linear
from ...fast.glm import FastRMSNorm
from ...kernels.adapter_attention import varlen_attention
from ...kernels.norms import swiglu
from ...kernels.vision_rope import vision_rope_
from .vision import Glm4vVisionAttention, Glm4vVisionBlock, Glm4VisionMlp

class FastGlm4vVisionAttention(FastModule, Glm4vVisionAttention):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        if not self.kernels_usable(x) or x.dim() != 2:
            return Glm4vVisionAttention.forward(self, x, cos, sin, cu_seqlens)
        qkv = linear(x, self.qkv)  # [N, 3E]: q | k | v, heads contiguous in each
        vision_rope_(qkv, cos.float(), sin.float(), self.num_heads)  # the tower's tables are fp32 already
        # No max_seqlen: the grid then covers all rows per image and the programs past an image's end exit
        # at once - cheaper than the host sync that reading the longest image would cost every block.
        o = varlen_attention(qkv, self.num_heads, cu_seqlens.to(torch.int32))
        return linear(o, self.proj)


class FastGlm4VisionMlp(FastModule, Glm4VisionMlp):
    @classmethod
    def from_reference(cls, ref: Glm4VisionMlp) -> "FastGlm4VisionMlp":
        """Fuse gate and up into one [2F, hidden] weight (gate first: swiglu's layout, silu(gate) * up)."""
        fast = super().from_reference(ref)
        gate, up = fast.gate_proj, fast.up_proj
        if gate.bias is not None or up.bias is not None:
            raise ValueError("FastGlm4VisionMlp expects bias-free gate/up projections, as Glm4VisionMlp builds")
        fused, _ = fuse_projections(gate, up)
        if isinstance(fused, nn.Module):
            fast.gate_up_weight = fused  # quantized tower: the fused layer
        else:
            fast.register_buffer("gate_up_weight", fused, persistent=False)
        return fast

    def forward(self, x: Tensor) -> Tensor:
        if not self.kernels_usable(x):
            return Glm4VisionMlp.forward(self, x)
        return linear(swiglu(linear(x, self.gate_up_weight)), self.down_proj)


class FastGlm4vVisionBlock(FastModule, Glm4vVisionBlock):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        h = self.attn(self.norm1(x), cos, sin, cu_seqlens)
        if isinstance(self.norm2, FastRMSNorm):
            h, x = self.norm2(h, residual=x)  # x = x + h and its norm, in one pass
        else:
            x = x + h
            h = self.norm2(x)
        return x + self.mlp(h)


# this family's swaps, merged into apply_fast_kernels' table (autoglm_fast/families/__init__.py)
FAST_MODULES = {Glm4vVisionAttention: FastGlm4vVisionAttention, Glm4VisionMlp: FastGlm4VisionMlp,
                Glm4vVisionBlock: FastGlm4vVisionBlock}
