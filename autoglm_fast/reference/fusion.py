"""Gated three-way fusion at the backbone input (SPEC §2).

    g = sigmoid(W_g [v; a; t_j] + b)          three gates per text position
    z_j = g_v * v + g_a * a + g_t * t_j

v and a are per-sequence summaries (the mean of the request's adapted vision / audio tokens).
An absent modality has vector 0 *and* gate 0, so it contributes exactly nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedFusion(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.gate = nn.Linear(3 * hidden_size, 3)  # rows: (g_v, g_a, g_t)

    def gates(self, t: Tensor, v: Tensor, a: Tensor, has_v: Tensor, has_a: Tensor) -> Tensor:
        """[B, T, 3] gates; v/a are [B, H] (zeros where absent), has_v/has_a [B] bool."""
        B, T, H = t.shape
        va = torch.cat((v, a), dim=-1)[:, None, :].expand(B, T, 2 * H)
        g = torch.sigmoid(self.gate(torch.cat((va, t), dim=-1)))
        present = torch.stack((has_v, has_a, torch.ones_like(has_v)), dim=-1)  # [B, 3]
        return g * present[:, None, :].to(g.dtype)

    def forward(self, t: Tensor, v: Tensor | None = None, a: Tensor | None = None,
                has_v: Tensor | None = None, has_a: Tensor | None = None) -> Tensor:
        """t [B, T, H] text embeddings -> z [B, T, H].

        v, a: [B, H] or None (absent for the whole batch). has_v / has_a: [B] bool marking which
        rows really have that modality (default: every row, when the vector is given).
        """
        B, _, H = t.shape
        v, has_v = _summary(v, has_v, t, "v")
        a, has_a = _summary(a, has_a, t, "a")
        v = torch.where(has_v[:, None], v, 0.0)  # an absent modality's vector is 0 whatever was passed
        a = torch.where(has_a[:, None], a, 0.0)
        g = self.gates(t, v, a, has_v, has_a)
        return g[..., 0:1] * v[:, None] + g[..., 1:2] * a[:, None] + g[..., 2:3] * t


def _summary(x: Tensor | None, present: Tensor | None, t: Tensor, name: str) -> tuple[Tensor, Tensor]:
    B, _, H = t.shape
    if x is None:
        if present is not None and bool(present.any()):
            raise ValueError(f"has_{name} marks rows present but {name} is None")
        return t.new_zeros(B, H), torch.zeros(B, dtype=torch.bool, device=t.device)
    if x.shape != (B, H):
        raise ValueError(f"{name} must have shape ({B}, {H}), got {tuple(x.shape)}")
    if present is None:
        present = torch.ones(B, dtype=torch.bool, device=t.device)
    elif present.shape != (B,) or present.dtype != torch.bool:
        raise ValueError(f"has_{name} must be a bool tensor of shape ({B},)")
    return x.to(t.dtype), present
