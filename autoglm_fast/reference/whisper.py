"""Eager Whisper encoder: the math and parameter names of HF `WhisperEncoder`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_fast.config import AudioConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed position table [length, channels]: sin half then cos half, geometric timescales."""
    if channels % 2 != 0 or channels < 4:
        raise ValueError(f"sinusoids needs an even channel count >= 4, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length).view(-1, 1) * inv_timescales.view(1, -1)
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.k_proj = nn.Linear(d_model, d_model, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        # Scale q before the matmul (not inside SDPA), as HF and OpenAI do: Whisper is sensitive to the rounding.
        q = self.q_proj(x) * self.head_dim**-0.5
        q, k, v = (y.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for y in (q, self.k_proj(x), self.v_proj(x)))
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # bidirectional, no mask
        return self.out_proj(y.transpose(1, 2).reshape(n, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = WhisperAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # HF clamps fp16 activations to stay finite
            clamp = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-clamp, clamp)
        return x


class WhisperEncoder(nn.Module):
    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        with torch.no_grad():  # fixed table, not learned; on the meta device this is a shape-only no-op
            self.embed_positions.weight.copy_(sinusoids(config.max_source_positions, d))
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def _check_input(self, input_features: Tensor) -> None:
        mels, frames = self.config.num_mel_bins, 2 * self.config.max_source_positions
        if not isinstance(input_features, Tensor):
            raise TypeError(f"input_features must be a torch.Tensor, got {type(input_features).__name__}")
        if not input_features.is_floating_point():
            raise TypeError(f"input_features must be a floating-point tensor, got {input_features.dtype}")
        if input_features.ndim != 3:
            raise ValueError(f"input_features must be [N, {mels}, {frames}], got shape {tuple(input_features.shape)}")
        if input_features.shape[1] != mels:
            raise ValueError(f"input_features must have {mels} mel bins, got shape {tuple(input_features.shape)}")
        if input_features.shape[2] != frames:
            # Positions are added for the whole window, so shorter clips must be padded first (as in HF).
            raise ValueError(f"input_features must be padded to {frames} frames (2 * max_source_positions), "
                             f"got shape {tuple(input_features.shape)}")

    def forward(self, input_features: Tensor) -> Tensor:
        """[N, num_mel_bins, 2*max_source_positions] -> [N, max_source_positions, d_model]."""
        self._check_input(input_features)
        x = F.gelu(self.conv1(input_features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)
