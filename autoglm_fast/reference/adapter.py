"""The article's Dual-Path Cross-Modal Adapter (DPCMA), plus the Linear connector to the text width.

`DualPathAdapter` keeps the article's attribute names and math exactly; the only addition is an
optional `key_padding_mask` so ragged audio batches can be padded without changing real rows.
"""
from __future__ import annotations

from torch import Tensor, nn


class DualPathAdapter(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int = 512, num_heads: int = 8,
                 ffn_multiplier: int = 4, dropout: float = 0.1):
        super().__init__()
        # Path 1: linear projection + LayerNorm (fast alignment).
        self.proj = nn.Linear(input_dim, hidden_dim)
        self.ln = nn.LayerNorm(hidden_dim)
        # Path 2: a light Transformer block (modulation).
        self.attn = nn.MultiheadAttention(embed_dim=hidden_dim, num_heads=num_heads, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * ffn_multiplier),
            nn.GELU(),
            nn.Linear(hidden_dim * ffn_multiplier, hidden_dim),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x [B, L, input_dim]; key_padding_mask [B, L] bool, True = padding (ignored as a key)."""
        h = self.ln(self.proj(x))
        attn_out, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        ffn_out = self.ffn(attn_out)
        return h + self.dropout(ffn_out)  # residual around path 2
