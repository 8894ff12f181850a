"""Eager GLM-4.1V vision tower: the math and parameter names of transformers' `Glm4vVisionModel`.

A checkpoint's `model.visual.*` tensors load here by name (strip the prefix, strict load). Data flow per
call, for patches already in the processor's spatial-merge-block order (each run of merge**2 patches is
one m x m square of the image):

    patch_embed (a GEMM) -> post_conv_layernorm -> + bicubic-resampled position table
    -> depth x [x += attn(norm1(x)) with 2D RoPE, per-frame varlen; x += SwiGLU(norm2(x))]
    -> post_layernorm -> downsample (m x m conv == a GEMM over each square) -> merger

The dtype casts are transformers': RoPE tables and the position-table resample are fp32, q/k are rotated
in fp32 and cast back, everything else runs in the weights' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...reference.glm import RMSNorm  # identical math to Glm4vRMSNorm
from .config import Glm4vVisionConfig


def rotate_half(x: Tensor) -> Tensor:
    """Half-split rotation (channel i pairs with i + D/2), not GLM text's interleaved pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_position_ids(grid_thw: Tensor, merge: int) -> Tensor:
    """[total_patches, 2] (row, col) of every patch, in spatial-merge-block order, repeated per frame."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        # raster (h, w) -> (h/m, m, w/m, m) -> blocks (h/m, w/m, m, m): the order the processor emits
        block = (h // merge, merge, w // merge, merge)
        rows, cols = (c.reshape(block).transpose(1, 2).flatten() for c in (rows, cols))
        out.append(torch.stack((rows, cols), dim=-1).repeat(t, 1))
    return torch.cat(out).to(grid_thw.device)


def vision_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """int32 attention segment bounds: one segment per frame (h*w patches), as transformers."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


class Glm4vVisionPatchEmbed(nn.Module):
    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        k = (config.temporal_patch_size, config.patch_size, config.patch_size)
        # Kept as Conv3d for the checkpoint's name and [hidden, C, T, P, P] shape; kernel == stride == the
        # whole patch, so the conv is exactly one GEMM over the flattened (C, T, P, P) patch.
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=k, stride=k)

    def forward(self, pixel_values: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.flatten(1), self.proj.bias)


class Glm4vVisionEmbeddings(nn.Module):
    """Learned side x side position table, resampled bicubically to each image's (h, w) grid."""

    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        self.side = config.image_size // config.patch_size
        self.position_embedding = nn.Embedding(self.side ** 2, config.hidden_size)

    def forward(self, x: Tensor, grid_thw: Tensor, pos_ids: Tensor) -> Tensor:
        weight = self.position_embedding.weight
        table = weight.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()  # [1, D, side, side]
        # each patch's own image height/width. transformers indexes grid_thw by attention segment (frame),
        # so its tower raises for t > 1; Glm4vModel flattens video grids to t == 1 rows first, which
        # gives exactly what this per-image lookup gives for the unflattened grid.
        counts = grid_thw.prod(-1)
        size_h = torch.repeat_interleave(grid_thw[:, 1], counts).float()
        size_w = torch.repeat_interleave(grid_thw[:, 2], counts).float()
        # patch centres in [-1, 1] (align_corners=False convention); grid_sample wants (x=col, y=row)
        norm_h = (pos_ids[:, 0] + 0.5) / size_h * 2 - 1
        norm_w = (pos_ids[:, 1] + 0.5) / size_w * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1)[None, :, None]  # [1, N, 1, 2]
        pos = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return x + pos[0, :, :, 0].t().to(weight.dtype)


def apply_rotary_vision(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, H, D] rotated in fp32 by cos/sin [N, D], cast back (as transformers)."""
    x32, cos, sin = x.float(), cos[:, None].float(), sin[:, None].float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class Glm4vVisionAttention(nn.Module):
    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [N, H, D]
        q, k = apply_rotary_vision(q, cos, sin), apply_rotary_vision(k, cos, sin)
        # Varlen, non-causal: each frame attends only to itself. One SDPA per segment keeps it plain;
        # the fast path is one varlen (cu_seqlens) flash-attention launch over the packed sequence.
        # SDPA gets 4D [1, H, L, D] as transformers passes it: CPU picks another kernel for 3D (bf16 differs).
        bounds = cu_seqlens.tolist()
        out = [F.scaled_dot_product_attention(*(t[None, s:e].transpose(1, 2) for t in (q, k, v)),
                                              scale=self.head_dim ** -0.5)[0].transpose(0, 1)
               for s, e in zip(bounds[:-1], bounds[1:])]
        return self.proj(torch.cat(out).reshape(n, -1))


class Glm4VisionMlp(nn.Module):
    """SwiGLU; note its width is `out_hidden_size` (4096), not `intermediate_size` (the merger's)."""

    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.out_hidden_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4vVisionBlock(nn.Module):
    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Glm4vVisionAttention(config)
        self.mlp = Glm4VisionMlp(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class Glm4vVisionPatchMerger(nn.Module):
    """Linear -> LayerNorm (with bias) -> exact GELU -> SwiGLU of width `intermediate_size`."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Glm4vVisionModel(nn.Module):
    def __init__(self, config: Glm4vVisionConfig) -> None:
        super().__init__()
        self.config = config
        d, m = config.hidden_size, config.spatial_merge_size
        self.embeddings = Glm4vVisionEmbeddings(config)
        self.patch_embed = Glm4vVisionPatchEmbed(config)
        self.blocks = nn.ModuleList(Glm4vVisionBlock(config) for _ in range(config.depth))
        self.merger = Glm4vVisionPatchMerger(config.out_hidden_size, config.intermediate_size)
        self.post_conv_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.downsample = nn.Conv2d(d, config.out_hidden_size, kernel_size=m, stride=m)
        self.post_layernorm = RMSNorm(d, config.rms_norm_eps)

    def vision_rotary(self, grid_thw: Tensor, pos_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """fp32 cos, sin [total_patches, head_dim]: axial 2D RoPE, laid out [row | col | row | col].

        The first head_dim/4 frequencies rotate by the patch's row, the next head_dim/4 by its column;
        the layout repeats so that rotate_half pairs channel i with i + head_dim/2 at the same angle.
        """
        if pos_ids is None:
            pos_ids = vision_position_ids(grid_thw, self.config.spatial_merge_size)
        spatial = self.config.head_dim // 2
        exponents = torch.arange(0, spatial, 2, dtype=torch.float32, device=pos_ids.device) / spatial
        inv_freq = 1.0 / (self.config.rope_theta ** exponents)  # on the fly: stays fp32 under .to(bf16)
        freqs = (pos_ids[:, :, None].float() * inv_freq).flatten(1)  # [N, (row freqs, col freqs)]
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def downsample_tokens(self, x: Tensor) -> Tensor:
        """[N, hidden] -> [N / m^2, out_hidden]: each run of m^2 patches is an m x m square, so the
        stride-m conv is one GEMM over the square's patches flattened (row, col, channel)."""
        m, w = self.config.spatial_merge_size, self.downsample.weight  # w [out, hidden, m, m]
        return F.linear(x.reshape(-1, m * m * x.shape[-1]), w.permute(0, 2, 3, 1).flatten(1), self.downsample.bias)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor, cu_seqlens: Tensor | None = None) -> Tensor:
        """pixel_values [total_patches, patch_dim], grid_thw [num_images, 3] -> [total_patches / m^2, out].

        `cu_seqlens` overrides the attention segments (default: one per frame, as transformers)."""
        pos_ids = vision_position_ids(grid_thw, self.config.spatial_merge_size)
        if cu_seqlens is None:
            cu_seqlens = vision_cu_seqlens(grid_thw)
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))
        cos, sin = self.vision_rotary(grid_thw, pos_ids)
        x = self.embeddings(x, grid_thw, pos_ids)
        x = self.run_blocks(x, cos, sin, cu_seqlens)
        return self.merger(self.downsample_tokens(self.post_layernorm(x)))

    def run_blocks(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor) -> Tensor:
        """The transformer blocks over packed patches [N, hidden]: nearly all of the tower's work, and the
        part the engine replays from CUDA graphs at padded patch counts (engine/encoder_graphs.py)."""
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return x
