"""Fast GLM backbone layers: drop-in twins of autoglm_fast/reference/glm.py on Triton kernels.

    FastGlmAttention   fused qkv GEMM (cuBLAS) -> bias + partial RoPE + K/V written into the paged
                       cache (one kernel) -> paged prefill (chunked, causal) or split-K decode attention
    FastRMSNorm        RMSNorm, optionally with the residual add fused: s = x + r; y = norm(s) (and GLM-4.1V's
                       sandwich norm of x before the add, in the same pass)
    FastGlmMLP         gate_up GEMM -> down GEMM with SwiGLU fused into its input (decode sizes), or
                       gate_up GEMM -> SwiGLU (one pass) -> down GEMM
    FastGlmDecoderLayer  the layer wiring; on the paged cache the residual stream is threaded between layers
    FastGlmModel       the decoder on the paged cache: each layer's MLP output is added to the residual by
                       the next layer's input norm (the last one's by the final norm), and no cos/sin tables
                       are built (the RoPE kernel computes its angles). 8 launches per decode layer.
Every projection may be a QuantLinear (weight-only int8 / int4): `linear` runs its Triton GEMV / GEMM
instead of cuBLAS, and the quantized down projection takes the SwiGLU into its GEMV the same way.

The attention kernels work on the paged KV cache (autoglm_fast/paged_cache.py). Without one (a
plain full forward, or the reference's contiguous KVCache) FastGlmAttention runs the reference math.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.norms import rms_norm, swiglu
from ..kernels.swiglu_down import MAX_ROWS as SWIGLU_DOWN_MAX_ROWS, swiglu_down
from ..kernels.paged_attention import paged_prefill_attention
from ..kernels.paged_decode import paged_decode_attention
from ..kernels.quant import GEMV_MAX_ROWS
from ..kernels.rotary_cache import qkv_rope_cache_write, rope_cos_sin_cache
from ..paged_cache import PagedLayerCache
from ..parallel.sharding import all_reduce
from ..reference.glm import GlmAttention, GlmDecoderLayer, GlmMLP, GlmModel, RMSNorm, rotary_inv_freq
from .base import FastModule
from .quant import FastQuantLinear, fuse_projections, linear


_COS_SIN_CACHES: dict[tuple, Tensor] = {}  # (rotary_dim, theta, max_positions, device) -> RoPE table


class FastRMSNorm(FastModule, RMSNorm):
    def forward(self, x: Tensor, residual: Tensor | None = None, pre: RMSNorm | None = None,
                in_place: bool = False):
        """rmsnorm(x); with `residual`: (rmsnorm(s), s) for s = x + residual, or s = pre(x) + residual with
        a sandwich norm `pre`. in_place: s is written into `residual`."""
        if not self.kernels_usable(x):
            if residual is None:
                return RMSNorm.forward(self, x if pre is None else pre(x))
            return _eager_add_norm(lambda s: RMSNorm.forward(self, s), x, residual, pre, in_place)
        if residual is None:
            return rms_norm(x if pre is None else pre(x), self.weight, self.variance_epsilon)
        return rms_norm(x, self.weight, self.variance_epsilon, residual=residual,
                        residual_out=residual if in_place else None,
                        pre_weight=None if pre is None else pre.weight,
                        pre_eps=None if pre is None else pre.variance_epsilon)


def add_norm(norm: RMSNorm, x: Tensor, residual: Tensor | None, pre: RMSNorm | None = None,
             in_place: bool = False) -> tuple[Tensor, Tensor]:
    """(norm(s), s) with s = pre(x) + residual (pre optional), fused where `norm` is fast; without a
    residual (the first layer) s is x itself."""
    if residual is None:
        x = x if pre is None else pre(x)
        return norm(x), x
    if isinstance(norm, FastRMSNorm):
        return norm(x, residual, pre, in_place)
    return _eager_add_norm(norm, x, residual, pre, in_place)


def _eager_add_norm(norm, x: Tensor, residual: Tensor, pre: RMSNorm | None, in_place: bool) -> tuple[Tensor, Tensor]:
    """add_norm's math op by op: s = pre(x) + residual (written into residual if in_place), (norm(s), s)."""
    s = (x if pre is None else pre(x)) + residual
    if in_place:
        s = residual.copy_(s)
    return norm(s), s


class FastGlmMLP(FastModule, GlmMLP):
    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x [..., hidden] -> [..., hidden] (into `out` if given). Decode sizes fuse SwiGLU into the down
        GEMM (one launch fewer); larger inputs keep cuBLAS for both GEMMs."""
        if not self.kernels_usable(x):
            y = GlmMLP.forward(self, x)
            return y if out is None else out.copy_(y)
        gate_up, down = linear(x, self.gate_up_proj), self.down_proj
        rows = gate_up.numel() // gate_up.shape[-1]
        if isinstance(down, FastQuantLinear) and rows <= GEMV_MAX_ROWS:
            return down(gate_up, swiglu=True, out=out)  # the quantized GEMV forms silu(gate) * up in its loads
        if isinstance(down, nn.Linear) and rows <= SWIGLU_DOWN_MAX_ROWS:
            return swiglu_down(gate_up, down.weight, out=out)
        return linear(swiglu(gate_up), down, out=out)


class FastGlmAttention(FastModule, GlmAttention):
    @classmethod
    def from_reference(cls, ref: GlmAttention) -> "FastGlmAttention":
        """Fuse q/k/v into one [(Hq + 2 Hkv) D, hidden] weight; q_proj/k_proj/v_proj keep their names
        and become views into it, so the state dict is unchanged and no weight is held twice.
        (Swap after moving the model to its device and dtype: a later .to() copies views apart.)"""
        fast = super().from_reference(ref)
        fused_w, fused_b = fuse_projections(fast.q_proj, fast.k_proj, fast.v_proj)
        if isinstance(fused_w, nn.Module):
            fast.qkv_weight = fused_w  # quantized: the fused layer (its buffers stay out of the state dict)
        else:
            fast.register_buffer("qkv_weight", fused_w, persistent=False)
        fast.register_buffer("qkv_bias", fused_b, persistent=False)
        return fast

    def cos_sin_cache(self, device: torch.device) -> Tensor:
        """fp32 [max_position_embeddings, rotary_dim] cos | sin table the RoPE kernel reads by position: made
        once per device and shared by every layer (kept out of buffers so .half() can't round it)."""
        key = (self.rotary_dim, self.rope_theta, self.max_position_embeddings, device)
        if key not in _COS_SIN_CACHES:
            inv_freq = rotary_inv_freq(self.rotary_dim, self.rope_theta, device)
            _COS_SIN_CACHES[key] = rope_cos_sin_cache(inv_freq, self.max_position_embeddings)
        return _COS_SIN_CACHES[key]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache=None) -> Tensor:
        if not isinstance(cache, PagedLayerCache) or not self.kernels_usable(x):
            return GlmAttention.forward(self, x, cos, sin, positions, cache)
        B, T, hidden = x.shape
        if B * T != cache.meta.positions.shape[0]:
            raise ValueError(f"the step's metadata describes {cache.meta.positions.shape[0]} tokens, the input has {B * T}")
        return self.output(self.attend(self.project(x.reshape(B * T, hidden), cache), cache)).reshape(B, T, -1)

    def project(self, x: Tensor, cache: PagedLayerCache, q_out: Tensor | None = None) -> Tensor:
        """x [N, hidden] -> q [N, heads, head_dim] (into q_out if given): the qkv GEMM, then bias + RoPE on q
        and k with k and v written into the paged cache, in one kernel. Reads only the step's positions,
        slots and M-RoPE rows."""
        meta = cache.meta
        # M-RoPE (GLM-4.1V): the rotary angles come from the step's (t, h, w) rows where the engine set them;
        # without them every row equals `positions` (text), which the 1-row path computes as is.
        rope = meta.rope_positions
        if rope is not None and self.mrope_section is None:
            raise ValueError("the step's metadata has rope_positions (M-RoPE) but the model's config has no "
                             "mrope_section")
        if meta.max_seq_len > self.max_position_embeddings:  # a host int: no sync
            raise ValueError(f"a sequence of the step has {meta.max_seq_len} tokens, more than the model's "
                             f"max_position_embeddings ({self.max_position_embeddings}), which the RoPE table covers")
        qkv = linear(x, self.qkv_weight)  # the bias is added by the epilogue
        return qkv_rope_cache_write(qkv, self.qkv_bias, meta.positions if rope is None else rope, meta.slot_mapping,
                                    self.cos_sin_cache(x.device), cache.k_pool, cache.v_pool, self.num_heads,
                                    self.num_kv_heads, self.head_dim, q_out=q_out,
                                    mrope_section=None if rope is None else self.mrope_section)

    def attend(self, q: Tensor, cache: PagedLayerCache, out: Tensor | None = None) -> Tensor:
        """q [N, heads, head_dim] -> o (into `out` if given) over the paged cache: the step's one-token rows
        (all of a decode step, the first num_decodes sequences of a mixed one) through the split-K decode
        kernel, prefill chunks through the prefill kernel - decode rows never fill a prefill tile."""
        meta, k, v = cache.meta, cache.k_pool, cache.v_pool
        o = torch.empty_like(q) if out is None else out
        d = meta.num_seqs if meta.is_decode else meta.num_decodes
        if d:
            paged_decode_attention(q[:d], k, v, meta.block_tables[:d], meta.seq_lens[:d], meta.max_seq_len, out=o[:d])
        if d < meta.num_seqs:
            loc = meta.prefill_query_start_loc if d else meta.query_start_loc
            paged_prefill_attention(q[d:], k, v, meta.block_tables[d:], meta.seq_lens[d:], loc, meta.max_query_len,
                                    out=o[d:], max_seq_len=meta.max_seq_len)
        return o

    def output(self, o: Tensor) -> Tensor:
        """o [N, heads, head_dim] -> [N, hidden]: the output projection."""
        return linear(o.reshape(o.shape[0], -1), self.o_proj)


class FastGlmDecoderLayer(FastModule, GlmDecoderLayer):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache=None) -> Tensor:
        h, x = self.after_attention(self.self_attn(self.input_layernorm(x), cos, sin, positions, cache), x)
        return x + (h if self.post_mlp_layernorm is None else self.post_mlp_layernorm(h))

    def before_attention(self, h: Tensor, residual: Tensor | None, pre: RMSNorm | None, cache: PagedLayerCache,
                         q_out: Tensor | None = None, in_place: bool = False) -> tuple[Tensor, Tensor]:
        """The layer up to attention, on the paged cache: the previous layer's MLP output h [N, hidden] is
        added to the residual stream (after its sandwich norm `pre`, if any) by the input norm, then qkv,
        RoPE and the K/V write -> (q, residual). With `after_attention` it is what a piecewise graph holds."""
        x, residual = add_norm(self.input_layernorm, h, residual, pre, in_place)
        return self.self_attn.project(x, cache, q_out), residual

    def after_attention(self, h: Tensor, residual: Tensor, out: Tensor | None = None,
                        in_place: bool = False) -> tuple[Tensor, Tensor]:
        """The layer after attention: h, the projected attention output -> (the MLP's output, the residual
        stream). The MLP output is not added here: the next norm adds it (after post_mlp_layernorm). Under tensor
        parallelism both sublayers' outputs are partial sums over the ranks: each is all-reduced here."""
        h = all_reduce(h, self.tensor_parallel)
        h, residual = add_norm(self.post_attention_layernorm, h, residual, self.post_self_attn_layernorm, in_place)
        return all_reduce(self.mlp(h) if out is None else self.mlp(h, out=out), self.tensor_parallel), residual


class FastGlmModel(FastModule, GlmModel):
    def forward(self, inputs_embeds: Tensor, positions: Tensor, caches=None, rope_positions: Tensor | None = None):
        if not (caches and isinstance(caches[0], PagedLayerCache) and self.kernels_usable(inputs_embeds)
                and all(isinstance(layer, FastGlmDecoderLayer) for layer in self.layers)):
            return GlmModel.forward(self, inputs_embeds, positions, caches, rope_positions)
        B, T, hidden = inputs_embeds.shape
        if B * T != caches[0].meta.positions.shape[0]:
            raise ValueError(f"the step's metadata describes {caches[0].meta.positions.shape[0]} tokens, the "
                             f"input has {B * T}")
        h, residual, pre = inputs_embeds.reshape(B * T, hidden), None, None
        for layer, cache in zip(self.layers, caches):
            q, residual = layer.before_attention(h, residual, pre, cache)
            attn = layer.self_attn
            h, residual = layer.after_attention(attn.output(attn.attend(q, cache)), residual)
            pre = layer.post_mlp_layernorm
        return add_norm(self.norm, h, residual, pre)[0].reshape(B, T, hidden)
