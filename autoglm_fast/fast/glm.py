"""Fast GLM backbone layers: drop-in twins of autoglm_fast/reference/glm.py on Triton kernels.

    FastGlmAttention   fused qkv GEMM (cuBLAS) -> bias + partial RoPE + K/V written into the paged
                       cache (one kernel) -> paged prefill (chunked, causal) or split-K decode attention
    FastRMSNorm        RMSNorm, optionally with the residual add fused: s = x + r; y = norm(s)
    FastGlmMLP         gate_up GEMM -> SwiGLU (one pass) -> down GEMM
    FastGlmDecoderLayer  the layer wiring, with the post-attention residual add fused into its norm
                       (after the sandwich norm of the attention output, where the config has them)

The attention kernels work on the paged KV cache (autoglm_fast/paged_cache.py). Without one (a
plain full forward, or the reference's contiguous KVCache) FastGlmAttention runs the reference math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.norms import rms_norm, swiglu
from ..kernels.paged_attention import paged_prefill_attention
from ..kernels.paged_decode import paged_decode_attention
from ..kernels.rotary_cache import qkv_rope_cache_write
from ..paged_cache import PagedLayerCache
from ..reference.glm import GlmAttention, GlmDecoderLayer, GlmMLP, RMSNorm, rotary_inv_freq
from .base import FastModule, fuse_linears


class FastRMSNorm(FastModule, RMSNorm):
    def forward(self, x: Tensor, residual: Tensor | None = None):
        """rmsnorm(x); with `residual`: (rmsnorm(x + residual), x + residual)."""
        if not self.kernels_usable(x):
            if residual is None:
                return RMSNorm.forward(self, x)
            s = x + residual
            return RMSNorm.forward(self, s), s
        return rms_norm(x, self.weight, self.variance_epsilon, residual=residual)


class FastGlmMLP(FastModule, GlmMLP):
    def forward(self, x: Tensor) -> Tensor:
        if not self.kernels_usable(x):
            return GlmMLP.forward(self, x)
        return F.linear(swiglu(F.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class FastGlmAttention(FastModule, GlmAttention):
    @classmethod
    def from_reference(cls, ref: GlmAttention) -> "FastGlmAttention":
        """Fuse q/k/v into one [(Hq + 2 Hkv) D, hidden] weight; q_proj/k_proj/v_proj keep their names
        and become views into it, so the state dict is unchanged and no weight is held twice.
        (Swap after moving the model to its device and dtype: a later .to() copies views apart.)"""
        fast = super().from_reference(ref)
        fused_w, fused_b = fuse_linears(fast.q_proj, fast.k_proj, fast.v_proj)
        fast.register_buffer("qkv_weight", fused_w, persistent=False)
        fast.register_buffer("qkv_bias", fused_b, persistent=False)
        fast._inv_freq = {}
        return fast

    def inv_freq(self, device: torch.device) -> Tensor:
        """fp32 rotary frequencies, made once per device (kept out of buffers so .half() can't round them)."""
        if device not in self._inv_freq:
            self._inv_freq[device] = rotary_inv_freq(self.rotary_dim, self.rope_theta, device)
        return self._inv_freq[device]

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
        qkv = F.linear(x, self.qkv_weight)  # the bias is added by the epilogue
        return qkv_rope_cache_write(qkv, self.qkv_bias, meta.positions if rope is None else rope, meta.slot_mapping,
                                    self.inv_freq(x.device), cache.k_pool, cache.v_pool, self.num_heads,
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
        return F.linear(o.reshape(o.shape[0], -1), self.o_proj.weight)


class FastGlmDecoderLayer(FastModule, GlmDecoderLayer):
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, cache=None) -> Tensor:
        return self.after_attention(self.self_attn(self.input_layernorm(x), cos, sin, positions, cache), x)

    def before_attention(self, x: Tensor, cache: PagedLayerCache, q_out: Tensor | None = None) -> Tensor:
        """The layer up to attention, on the paged cache: x [N, hidden] -> q (input norm, qkv, RoPE, K/V write).
        With `after_attention` it is what a piecewise graph holds (engine/piecewise_graphs.py)."""
        return self.self_attn.project(self.input_layernorm(x), cache, q_out)

    def after_attention(self, h: Tensor, x: Tensor) -> Tensor:
        """The layer after attention: h, the projected attention output, and x, the layer's input -> its output."""
        if self.post_self_attn_layernorm is not None:  # sandwich norms (GLM-4.1V): norm the output first
            h = self.post_self_attn_layernorm(h)
        if isinstance(self.post_attention_layernorm, FastRMSNorm):
            h, x = self.post_attention_layernorm(h, residual=x)  # x = x + h and its norm, in one pass
        else:
            x = x + h
            h = self.post_attention_layernorm(x)
        h = self.mlp(h)
        return x + (h if self.post_mlp_layernorm is None else self.post_mlp_layernorm(h))
