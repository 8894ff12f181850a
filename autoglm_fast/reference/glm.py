"""GLM-4 decoder in plain PyTorch: the math and parameter names of HF `GlmForCausalLM`.

RMSNorm, q/k/v bias (no o bias), partial interleaved rotary on the first half of each head,
grouped-query attention, SwiGLU with a fused `gate_up_proj`, untied `lm_head`. Decoding is
incremental through `KVCache` with explicit per-token positions, so kernels and the engine
can be checked step by step against this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig
from ..parallel.sharding import all_reduce


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32, cast back before the weight multiply (as HF does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


def rotary_inv_freq(rotary_dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """fp32 [rotary_dim / 2] inverse frequencies, computed exactly as HF GLM does."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta ** exponents)


class RotaryEmbedding(nn.Module):
    """cos/sin for GLM's partial rotary: frequencies over `rotary_dim`, pairs interleaved. Under M-RoPE
    (GLM-4.1V) positions have a row per axis (t, h, w) and `mrope_section` says how many consecutive
    frequencies each row drives."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.rotary_dim, self.theta = config.rotary_dim, config.rope_theta
        self.mrope_section = config.mrope_section

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [B, T] (or [rows, B, T] under M-RoPE) -> cos, sin [B, T, rotary_dim] in fp32, each
        frequency repeated for its pair."""
        # inv_freq is computed on the fly (a few dozen values), not kept as a buffer, so it stays fp32
        # whatever dtype the model is cast to, and meta-device construction needs no re-init.
        freqs = positions[..., None].float() * rotary_inv_freq(self.rotary_dim, self.theta, positions.device)
        if self.mrope_section is not None:
            if positions.dim() == 2:  # text only: every axis at the same position
                freqs = freqs.expand(len(self.mrope_section), *freqs.shape)
            freqs = torch.cat([run[i] for i, run in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        freqs = freqs.repeat_interleave(2, dim=-1)
        return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; rotate pairs (x0, x1), (x2, x3), ... of the first rotary_dim channels."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class KVCache(nn.Module):
    """Contiguous per-layer cache [B, max_len, kv_heads, head_dim] written at explicit positions.

    (The paged cache of the fast path lives with its kernels; this one is for readability.)
    """

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if int(positions.max()) >= self.k.shape[1]:
            raise ValueError(f"position {int(positions.max())} is past the cache length {self.k.shape[1]}")
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, positions] = k.to(self.k.dtype)
        self.v[rows, positions] = v.to(self.v.dtype)
        return self.k[: k.shape[0]], self.v[: k.shape[0]]


class GlmAttention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings  # the fast attention's cos/sin table
        self.mrope_section = config.mrope_section  # the fast attention's M-RoPE (cos/sin come ready here)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"GlmAttention takes a KVCache; a {type(cache).__name__} needs the fast attention "
                            "(autoglm_fast.apply_fast_kernels(model))")
        if cache is not None:
            k, v = cache.update(positions, k, v)
            key_positions = torch.arange(k.shape[1], device=x.device)
        else:
            key_positions = positions[0] if positions.shape[0] == 1 else positions
        # Causal by position: a query sees every key at or before its own position.
        if key_positions.dim() == 1:
            mask = key_positions[None, None, :] <= positions[:, :, None]
        else:
            mask = key_positions[:, None, :] <= positions[:, :, None]
        groups = self.num_heads // self.num_kv_heads
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class GlmMLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class GlmDecoderLayer(nn.Module):
    tensor_parallel = None  # a rank's layer (parallel/sharding.py): each sublayer's output is summed over ranks

    def __init__(self, config: TextConfig):
        super().__init__()
        self.self_attn = GlmAttention(config)
        self.mlp = GlmMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.sandwich_norms:  # GLM-4.1V: each sublayer's output is normed before its residual add
            self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                cache: KVCache | None = None) -> Tensor:
        h = all_reduce(self.self_attn(self.input_layernorm(x), cos, sin, positions, cache), self.tensor_parallel)
        x = x + (h if self.post_self_attn_layernorm is None else self.post_self_attn_layernorm(h))
        h = all_reduce(self.mlp(self.post_attention_layernorm(x)), self.tensor_parallel)
        return x + (h if self.post_mlp_layernorm is None else self.post_mlp_layernorm(h))


class GlmModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GlmDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, inputs_embeds: Tensor, positions: Tensor,
                caches: list[KVCache] | None = None, rope_positions: Tensor | None = None) -> Tensor:
        """positions [B, T]: each token's index in its sequence (cache slot, causal order).
        rope_positions: what the rotary embedding sees when that differs (M-RoPE: [3, B, T])."""
        cos, sin = self.rotary_emb(positions if rope_positions is None else rope_positions)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, None if caches is None else caches[i])
        return self.norm(x)


def default_positions(input_shape: torch.Size | tuple[int, ...], start: int | Tensor = 0,
                      device: torch.device | str | None = None) -> Tensor:
    """[B, T] positions start..start+T-1 (start may be a per-row [B] tensor)."""
    B, T = input_shape[0], input_shape[1]
    start = torch.as_tensor(start, device=device).reshape(-1, 1)
    return (start + torch.arange(T, device=device)).expand(B, T)


def check_positions(positions: Tensor, batch: int, length: int) -> Tensor:
    """Accept [T] or [B, T] integer positions; return [B, T]."""
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError("positions must be an int32/int64 tensor")
    if positions.dim() == 1:
        positions = positions[None].expand(batch, -1)
    if positions.shape != (batch, length):
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected ({batch}, {length}) or ({length},)")
    if bool((positions < 0).any()):
        raise ValueError("positions must be non-negative")
    return positions


def make_caches(config: TextConfig, batch_size: int, max_len: int, like: Tensor) -> list[KVCache]:
    """One KVCache per layer, in the dtype/device of `like` (e.g. a model weight)."""
    return [KVCache(batch_size, max_len, config.num_key_value_heads, config.head_dim, like.dtype, like.device)
            for _ in range(config.num_hidden_layers)]


class GlmForCausalLM(nn.Module):
    """Text-only GLM: `model.*` and `lm_head.*` names load HF `GlmForCausalLM` checkpoints as they are."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.model = GlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def setup_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        return make_caches(self.config, batch_size, max_len, self.lm_head.weight)

    def forward(self, input_ids: Tensor | None = None, positions: Tensor | None = None,
                caches: list[KVCache] | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        positions = (default_positions((B, T), device=inputs_embeds.device) if positions is None
                     else check_positions(positions, B, T))
        return self.lm_head(self.model(inputs_embeds, positions, caches))
