"""Eager CLIP ViT vision tower: the math and parameter names of HF `CLIPVisionModel`.

Keys carry the `vision_model.` prefix used by CLIP checkpoints on disk (transformers 4.x `CLIPVisionModel`,
`CLIPModel`); transformers 5 strips that prefix when loading, so its in-memory keys lack it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoglm_fast.config import VisionConfig


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_tokens, d)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, d, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # row-major patch order, as HF
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        # Positions are always 0..num_tokens-1 (no interpolation), so the whole table is added.
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (proj(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)  # bidirectional, no mask
        return self.out_proj(y.transpose(1, 2).reshape(n, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu  # HF "gelu" is the exact erf form
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic) HF's name
        self.encoder = CLIPEncoder(config)
        # Unused by forward (we return patch features, not the pooled CLS); kept so checkpoints map by name.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        # hidden_states[i] is the output of i layers, so only the first i need computing.
        self.num_layers_used = config.feature_layer % (config.num_hidden_layers + 1)

    def _check_input(self, pixel_values: Tensor) -> None:
        c, s = self.config.num_channels, self.config.image_size
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be [N, {c}, {s}, {s}], got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != c:
            raise ValueError(f"pixel_values must have {c} channels, got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[2:] != (s, s):
            raise ValueError(f"pixel_values must be {s}x{s} images (config.image_size), "
                             f"got shape {tuple(pixel_values.shape)}")

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[N, C, S, S] -> [N, num_tokens, hidden]: HF `hidden_states[config.feature_layer]`."""
        self._check_input(pixel_values)
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers[: self.num_layers_used]:
            x = layer(x)
        return x
