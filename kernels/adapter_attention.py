"""Non-causal flash attention over a packed qkv: the adapter's `nn.MultiheadAttention(512, 8, batch_first=True)`
and GLM-4.1V's vision tower.

Reads q, k and v straight out of the fused in-projection output `qkv = h @ in_proj_weight^T + b` (no split /
transpose copies), runs an online softmax over key blocks (`flash.softmax_step`, shared with the paged
kernels) and writes o ready for the out-projection. One kernel, two launches (a constexpr picks the rows):

- `adapter_attention`: a padded batch qkv [B, L, 3E] with an optional key-padding mask (ragged audio);
- `varlen_attention`: several sequences packed in qkv [N, 3E] with int32 `cu_seqlens`, each query seeing only
  its own segment's keys (the vision tower's images, head_dim 128).
Eager references: `reference_attention` (the math inside nn.MultiheadAttention), `reference_varlen_attention`.
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


@autotune(ATTN_CONFIGS, key=["L_BUCKET", "HEAD_DIM", "VARLEN"])
@triton.jit
def adapter_attention_kernel(qkv_ptr, mask_ptr, o_ptr, L, L_BUCKET, stride_qb, stride_ql, stride_mb, stride_ob,
                             stride_ol, qk_scale, cu_seqlens_ptr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Padded batch (VARLEN=False): b is a batch row of L positions. Varlen: b is a segment of one packed
    sequence, rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1, and L is only the grid's bound (max_seqlen)."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // NUM_HEADS, pid_bh % NUM_HEADS
    E: tl.constexpr = NUM_HEADS * HEAD_DIM
    if VARLEN:
        first = tl.load(cu_seqlens_ptr + b)
        seq_len = tl.load(cu_seqlens_ptr + b + 1) - first
        if pid_m * BLOCK_M >= seq_len:  # the grid covers the longest segment; shorter ones stop here
            return
        base = qkv_ptr + first.to(tl.int64) * stride_ql + h * HEAD_DIM
        o_base = o_ptr + first.to(tl.int64) * stride_ol + h * HEAD_DIM
    else:
        seq_len = L
        base = qkv_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM
        o_base = o_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(base + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=(offs_m[:, None] < seq_len) & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives p = 0, not NaN
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < seq_len
        if HAS_MASK:  # key_padding_mask: nonzero = padding, ignored as a key
            pad = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_n, mask=valid, other=1)
            valid = valid & (pad == 0)
        kv_mask = (offs_n[:, None] < seq_len) & mask_d[None, :]
        k = tl.load(base + E + offs_n[:, None] * stride_ql + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + 2 * E + offs_n[:, None] * stride_ql + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2 domain: qk_scale has log2(e)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, IEEE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with every key padded gives 0 (torch: NaN)
    o_ptrs = o_base + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < seq_len) & mask_d[None, :])


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
        _LOG2E / math.sqrt(D), qkv, NUM_HEADS=num_heads, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        HAS_MASK=key_padding_mask is not None, VARLEN=False, IEEE=qkv.dtype == torch.float32)
    return out


def varlen_attention(qkv: torch.Tensor, num_heads: int, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [N, 3E]: several sequences packed one after another (segment i is rows cu_seqlens[i] ..
    cu_seqlens[i + 1] - 1, int32 cu_seqlens [num_seqs + 1] from 0 to N) -> o [N, E], each query attending
    to the keys of its own segment only (non-causal; the vision tower's images).

    max_seqlen bounds the grid: the longest segment, or None for N (always enough, no host sync; exact for
    one segment, and programs past a shorter segment's end stop at once). cu_seqlens' values are not
    checked (a host sync): a segment longer than max_seqlen leaves rows unwritten."""
    check_tensor("qkv", qkv, ndim=2)
    N, three_e = qkv.shape
    if not isinstance(num_heads, int) or num_heads < 1 or three_e % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {three_e} must be 3 * num_heads * head_dim (num_heads={num_heads})")
    E = three_e // 3
    D = E // num_heads
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), like=qkv)
    if cu_seqlens.shape[0] < 1 or cu_seqlens.stride(0) != 1:
        raise ValueError(f"cu_seqlens must be a contiguous [num_seqs + 1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if max_seqlen is None:
        max_seqlen = N
    if not isinstance(max_seqlen, int) or not 0 <= max_seqlen <= N:
        raise ValueError(f"max_seqlen must be an int in [0, N={N}], got {max_seqlen!r}")
    if out is None:
        out = torch.empty(N, E, device=qkv.device, dtype=qkv.dtype)
    check_tensor("out", out, ndim=2, like=qkv)
    check_shape("out", out, (N, E))
    num_seqs = cu_seqlens.shape[0] - 1
    if N == 0 or num_seqs == 0 or max_seqlen == 0:
        return out
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), num_seqs * num_heads)  # noqa: E731
    adapter_attention_kernel[grid](
        qkv, qkv, out, max_seqlen, min(triton.next_power_of_2(max_seqlen), 4096), 0, qkv.stride(0), 0, 0,
        out.stride(0), _LOG2E / math.sqrt(D), cu_seqlens, NUM_HEADS=num_heads, HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)), HAS_MASK=False, VARLEN=True, IEEE=qkv.dtype == torch.float32)
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


def reference_varlen_attention(qkv: torch.Tensor, num_heads: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Eager varlen: `reference_attention` on each segment alone, the outputs packed back together."""
    bounds = cu_seqlens.tolist()
    out = qkv.new_zeros(qkv.shape[0], qkv.shape[1] // 3)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = reference_attention(qkv[None, start:end], num_heads)[0]
    return out


def compile_specs():
    """Every config, at the launches the model makes (compile matrix).

    - adapter (padded, masked): a ragged batch of 2 audio clips padded to L=375 tokens (30 s), qkv
      [2, 375, 1536] from the in-projection, 8 heads x 64, bool key-padding mask [2, 375];
    - vision (varlen, kernel label "varlen"): GLM-4.1V's tower, 12 heads x 128 over the packed qkv
      [N, 4608]: one 1080x2400 screenshot (12,432 patches, one segment, max_seqlen = N), and three small
      images packed together (4x6, 10x8, 6x4 patches: N = 128, max_seqlen = 80), the latter at the
      interpreter's config only (it differs from the screenshot only in the launch's ints)."""
    from .specs import CompileSpec, TensorArg
    specs = []
    L, heads, head_dim = 375, 8, 64  # B = 2 clips: strides only
    E = heads * head_dim
    for dtype in ("fp16", "bf16"):
        t = TensorArg(dtype)
        args = {"qkv_ptr": t, "mask_ptr": TensorArg("u8"), "o_ptr": t, "L": L,
                "L_BUCKET": triton.next_power_of_2(L), "stride_qb": L * 3 * E, "stride_ql": 3 * E, "stride_mb": L,
                "stride_ob": L * E, "stride_ol": E, "qk_scale": _LOG2E / math.sqrt(head_dim), "cu_seqlens_ptr": t,
                "NUM_HEADS": heads, "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "HAS_MASK": True, "VARLEN": False,
                "IEEE": False}
        for cfg in ATTN_CONFIGS:
            specs.append(CompileSpec.from_config(
                "adapter_attention", adapter_attention_kernel, args, cfg,
                label=f"{dtype} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"))
    heads, head_dim = 12, 128
    E = heads * head_dim
    for n, max_seqlen, configs, dtypes in ((12_432, 12_432, ATTN_CONFIGS, ("fp16", "bf16")),
                                           (128, 80, ATTN_CONFIGS[:1], ("fp16",))):
        for dtype in dtypes:
            t = TensorArg(dtype)
            args = {"qkv_ptr": t, "mask_ptr": t, "o_ptr": t, "L": max_seqlen,
                    "L_BUCKET": min(triton.next_power_of_2(max_seqlen), 4096), "stride_qb": 0, "stride_ql": 3 * E,
                    "stride_mb": 0, "stride_ob": 0, "stride_ol": E, "qk_scale": _LOG2E / math.sqrt(head_dim),
                    "cu_seqlens_ptr": TensorArg("i32"), "NUM_HEADS": heads, "HEAD_DIM": head_dim,
                    "BLOCK_D": head_dim, "HAS_MASK": False, "VARLEN": True, "IEEE": False}
            for cfg in configs:
                specs.append(CompileSpec.from_config(
                    "adapter_attention", adapter_attention_kernel, args, cfg,
                    label=f"varlen N={n} {dtype} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} "
                          f"w{cfg.num_warps} s{cfg.num_stages}"))
    return specs
