"""Non-causal flash attention for the adapter's `nn.MultiheadAttention(512, 8, batch_first=True)`.

Reads q, k and v straight out of the fused in-projection output `qkv = h @ in_proj_weight^T + b`
([B, L, 3E], no split / transpose copies), runs an online softmax over key blocks with an optional
key-padding mask (ragged audio batches), and writes o [B, L, E] ready for the out-projection.
Eager reference: `reference_attention` below (the math inside nn.MultiheadAttention).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash import eager_probs, softmax_step
from .utils import autotune, check_shape, check_tensor, compute_dtype

ATTN_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
]
_LOG2E = 1.4426950408889634


@autotune(ATTN_CONFIGS, key=["L_BUCKET", "HEAD_DIM"])
@triton.jit
def adapter_attention_kernel(qkv_ptr, mask_ptr, o_ptr, L, L_BUCKET, stride_qb, stride_ql, stride_mb, stride_ob,
                             stride_ol, qk_scale, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // NUM_HEADS, pid_bh % NUM_HEADS
    E: tl.constexpr = NUM_HEADS * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    base = qkv_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    q = tl.load(base + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives p = 0, not NaN
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < L
        if HAS_MASK:  # key_padding_mask: nonzero = padding, ignored as a key
            pad = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_n, mask=valid, other=1)
            valid = valid & (pad == 0)
        kv_mask = (offs_n[:, None] < L) & mask_d[None, :]
        k = tl.load(base + E + offs_n[:, None] * stride_ql + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * E + offs_n[:, None] * stride_ql + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2 domain: qk_scale has log2(e)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, IEEE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with every key padded gives 0 (torch: NaN)
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_ol + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < L) & mask_d[None, :])


def adapter_attention(qkv: torch.Tensor, num_heads: int, key_padding_mask: torch.Tensor | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, L, 3E] (q | k | v, heads contiguous inside each) -> softmax(q k^T / sqrt(d)) v as [B, L, E]."""
    check_tensor("qkv", qkv, ndim=3)
    B, L, three_e = qkv.shape
    if not isinstance(num_heads, int) or num_heads < 1 or three_e % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {three_e} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    E = three_e // 3
    D = E // num_heads
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,), contiguous_last=True)
        check_shape("key_padding_mask", key_padding_mask, (B, L))
        if key_padding_mask.device != qkv.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but qkv is on {qkv.device}")
    if out is None:
        out = torch.empty(B, L, E, device=qkv.device, dtype=qkv.dtype)
    check_tensor("out", out, ndim=3, like=qkv)
    check_shape("out", out, (B, L, E))
    if B == 0 or L == 0:
        return out
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else qkv
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * num_heads)  # noqa: E731
    adapter_attention_kernel[grid](
        qkv, mask, out, L, min(triton.next_power_of_2(L), 4096), qkv.stride(0), qkv.stride(1),
        mask.stride(0) if key_padding_mask is not None else 0, out.stride(0), out.stride(1),
        _LOG2E / math.sqrt(D), NUM_HEADS=num_heads, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_MASK=key_padding_mask is not None, IEEE=qkv.dtype == torch.float32)
    return out


def reference_attention(qkv: torch.Tensor, num_heads: int, key_padding_mask: torch.Tensor | None = None):
    """Eager: what nn.MultiheadAttention computes between its in- and out-projection (fp32 inside, the
    probabilities rounded to the input dtype as eager attention rounds them)."""
    B, L, three_e = qkv.shape
    q, k, v = qkv.to(compute_dtype(qkv.dtype)).view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    o = eager_probs(scores, qkv.dtype) @ v
    return o.transpose(1, 2).reshape(B, L, -1).to(qkv.dtype)


def compile_specs():
    """Every config, at the masked launch (compile matrix): a ragged batch of 2 audio clips padded to L=375
    tokens (30 s), qkv [2, 375, 1536] from the in-projection, 8 heads x 64, bool key-padding mask [2, 375]."""
    from .specs import CompileSpec, TensorArg
    B, L, heads, head_dim = 2, 375, 8, 64
    E = heads * head_dim
    specs = []
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        args = {"qkv_ptr": t, "mask_ptr": TensorArg("u8"), "o_ptr": t, "L": L,
                "L_BUCKET": triton.next_power_of_2(L), "stride_qb": L * 3 * E, "stride_ql": 3 * E, "stride_mb": L,
                "stride_ob": L * E, "stride_ol": E, "qk_scale": _LOG2E / math.sqrt(head_dim), "NUM_HEADS": heads,
                "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "HAS_MASK": True, "IEEE": False}
        for cfg in ATTN_CONFIGS:
            specs.append(CompileSpec.from_config(
                "adapter_attention", adapter_attention_kernel, args, cfg,
                label=f"{dtype} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"))
    return specs
