"""FastDualPathAdapter: the article's adapter on fused Triton kernels.

    h   = LayerNorm(x W_p^T + b_p)                  fused_linear(epilogue="layernorm")
    qkv = h W_in^T + b_in                           one GEMM for q, k and v
    o   = softmax(q k^T / 8) v                      adapter_attention (flash, key-padding mask)
    y   = h + (gelu(o' W_1^T + b_1) W_2^T + b_2)    fused_linear "gelu", then "residual" (o' = out_proj(o))
Reference: autoglm_fast/reference/adapter.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.adapter_attention import adapter_attention
from ..kernels.linear import fused_linear
from ..reference.adapter import DualPathAdapter
from .base import FastModule


class FastDualPathAdapter(FastModule, DualPathAdapter):
    has_dropout = True
    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.kernels_usable(x):
            return DualPathAdapter.forward(self, x, key_padding_mask)
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq, features], got shape {tuple(x.shape)}")
        up, down = self.ffn[0], self.ffn[2]
        h = fused_linear(x, self.proj.weight, self.proj.bias, epilogue="layernorm",
                         ln_weight=self.ln.weight, ln_bias=self.ln.bias, eps=self.ln.eps)
        hidden = fused_linear(self.attn_block(h, key_padding_mask), up.weight, up.bias, epilogue="gelu")
        return fused_linear(hidden, down.weight, down.bias, epilogue="residual", residual=h)

    def attn_block(self, h: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """What `self.attn(h, h, h)[0]` computes: fused QKV GEMM, flash attention, out-projection."""
        attn = self.attn
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # plain GEMMs: cuBLAS is the right tool
        o = adapter_attention(qkv, attn.num_heads, key_padding_mask)
        return F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
