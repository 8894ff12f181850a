"""QKV epilogue: bias add + GLM partial interleaved rotary on q and k + paged K/V cache write, one pass.

The fused q|k|v GEMM output (no bias) is read once per token; q goes to `q_out` [tokens, heads, head_dim],
k and v go straight into the pools [num_blocks, block_size, kv_heads, head_dim] at `slot_mapping[token]`
(no intermediate K/V tensors, the pools are written in place through their strides). The angle is
position * inv_freq in fp32 exactly as the reference computes it; the rotation is done in fp32.
M-RoPE (GLM-4.1V): positions get a row per axis (t, h, w) and `mrope_section` splits the frequencies into
consecutive runs, each run's angles taken from its row's position (a constexpr-specialized variant).
Eager reference: `reference_qkv_rope_cache_write` (autoglm_fast/reference/glm.py's apply_rotary math).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_shape, check_tensor

PAIRS_PER_PROGRAM = 512  # a program takes this many (even, odd) pairs: 8 heads of 128 channels


# stride_pr (M-RoPE's row stride) follows the step's token count: not specialized, so it adds no variants.
@triton.jit(do_not_specialize=["stride_pr"])
def qkv_rope_cache_kernel(qkv_ptr, bias_ptr, pos_ptr, slot_ptr, inv_freq_ptr, q_ptr, k_ptr, v_ptr,
                          num_heads, num_kv_heads, block_size, stride_xt, stride_qt, stride_qh,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_pr,
                          HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HEADS: tl.constexpr, HALF_BLOCK: tl.constexpr, MROPE: tl.constexpr,
                          SECTION_1: tl.constexpr, SECTION_2: tl.constexpr):
    # Program (token, group): heads [group * HEADS, +HEADS) of the row's q | k | v heads. Channels are
    # loaded as even / odd halves so the interleaved pairs (x0, x1), (x2, x3)... line up elementwise.
    tok = tl.program_id(0)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    i = tl.arange(0, HALF_BLOCK)
    n_qk = num_heads + num_kv_heads
    valid = (h < n_qk + num_kv_heads)[:, None] & (i < HEAD_DIM // 2)[None, :]
    col = h[:, None] * HEAD_DIM + 2 * i[None, :]
    row = qkv_ptr + tok.to(tl.int64) * stride_xt
    even = tl.load(row + col, mask=valid, other=0.0).to(tl.float32)
    odd = tl.load(row + col + 1, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        even += tl.load(bias_ptr + col, mask=valid, other=0.0).to(tl.float32)
        odd += tl.load(bias_ptr + col + 1, mask=valid, other=0.0).to(tl.float32)
    # Same fp32 product as the reference's positions.float() * inv_freq, so the angle matches bit for bit.
    if MROPE:
        # Frequencies [0, SECTION_1) follow row 0 (t), [SECTION_1, SECTION_2) row 1 (h), the rest row 2 (w);
        # with 2 rows SECTION_2 == ROT_PAIRS. Three uniform scalar loads and a select: no per-lane gather.
        pos = tl.load(pos_ptr + tok).to(tl.float32)
        pos = tl.where(i < SECTION_1, pos, tl.load(pos_ptr + stride_pr + tok).to(tl.float32))
        if SECTION_2 < ROT_PAIRS:
            pos = tl.where(i < SECTION_2, pos, tl.load(pos_ptr + 2 * stride_pr + tok).to(tl.float32))
        freq = pos * tl.load(inv_freq_ptr + i, mask=i < ROT_PAIRS, other=0.0)
    else:
        freq = tl.load(pos_ptr + tok).to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < ROT_PAIRS, other=0.0)
    cos, sin = tl.cos(freq)[None, :], tl.sin(freq)[None, :]
    rot = (h < n_qk)[:, None] & (i < ROT_PAIRS)[None, :]  # q and k heads, first rotary_dim channels
    out_even = tl.where(rot, even * cos - odd * sin, even)
    out_odd = tl.where(rot, odd * cos + even * sin, odd)

    is_q = valid & (h < num_heads)[:, None]
    q_dst = q_ptr + tok.to(tl.int64) * stride_qt + h[:, None] * stride_qh + 2 * i[None, :]
    tl.store(q_dst, out_even.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_dst + 1, out_odd.to(q_ptr.dtype.element_ty), mask=is_q)
    slot = tl.load(slot_ptr + tok)  # int64: block * stride_kb stays exact in huge pools
    block, offset = slot // block_size, slot % block_size
    kv = h - num_heads
    is_k = valid & ((kv >= 0) & (kv < num_kv_heads))[:, None]
    k_dst = k_ptr + block * stride_kb + offset * stride_ks + kv[:, None] * stride_kh + 2 * i[None, :]
    tl.store(k_dst, out_even.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_dst + 1, out_odd.to(k_ptr.dtype.element_ty), mask=is_k)
    vh = kv - num_kv_heads
    is_v = valid & (vh >= 0)[:, None]
    v_dst = v_ptr + block * stride_vb + offset * stride_vs + vh[:, None] * stride_vh + 2 * i[None, :]
    tl.store(v_dst, out_even.to(v_ptr.dtype.element_ty), mask=is_v)
    tl.store(v_dst + 1, out_odd.to(v_ptr.dtype.element_ty), mask=is_v)


def _launch_config(total_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(HEADS per program, HALF_BLOCK, num_warps) for a head layout."""
    half_block = triton.next_power_of_2(head_dim // 2)
    heads = min(triton.next_power_of_2(total_heads), max(1, PAIRS_PER_PROGRAM // half_block))
    # 8 warps at 512 pairs: with 4, Triton 3.6's sm_90 build spills a few bytes around sin/cos.
    return heads, half_block, 8 if heads * half_block >= 512 else (2 if heads * half_block >= 128 else 1)


def _check_index(name: str, t, num_tokens: int) -> None:
    check_tensor(name, t, ndim=1, dtypes=(torch.int64,))
    check_shape(name, t, (num_tokens,))


def _check_positions(positions, mrope_section, num_tokens: int, rot_pairs: int) -> tuple[int, int]:
    """Validate positions (and mrope_section under M-RoPE); the section boundaries (SECTION_1, SECTION_2)."""
    if not isinstance(positions, torch.Tensor) or positions.dim() == 1:
        _check_index("positions", positions, num_tokens)
        if mrope_section is not None:
            raise ValueError(f"mrope_section {mrope_section!r} needs M-RoPE positions [rows, num_tokens], got "
                             f"1-row positions of shape {tuple(positions.shape)}")
        return 0, 0
    check_tensor("positions", positions, dtypes=(torch.int64,))
    rows = positions.shape[0]
    if positions.dim() != 2 or rows not in (2, 3):
        raise ValueError(f"positions must be [num_tokens] or M-RoPE's [rows, num_tokens] with 2 or 3 rows, "
                         f"got shape {tuple(positions.shape)}")
    check_shape("positions", positions, (rows, num_tokens))
    if mrope_section is None:
        raise ValueError(f"positions has {rows} rows (M-RoPE) but mrope_section is None: pass the number of "
                         "frequencies each row drives, e.g. config.mrope_section")
    if not isinstance(mrope_section, (tuple, list)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in mrope_section):
        raise TypeError(f"mrope_section must be a tuple of positive ints, got {mrope_section!r}")
    if len(mrope_section) != rows:
        raise ValueError(f"mrope_section {tuple(mrope_section)} has {len(mrope_section)} parts but positions has "
                         f"{rows} rows")
    if sum(mrope_section) != rot_pairs:
        raise ValueError(f"mrope_section {tuple(mrope_section)} sums to {sum(mrope_section)}, not rotary_dim / 2 = "
                         f"{rot_pairs} (inv_freq's length)")
    return mrope_section[0], (mrope_section[0] + mrope_section[1] if rows == 3 else rot_pairs)


def qkv_rope_cache_write(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                         slot_mapping: torch.Tensor, inv_freq: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                         q_out: torch.Tensor | None = None,
                         mrope_section: tuple[int, ...] | None = None) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] -> q [tokens, heads, head_dim]; k, v written to the pools.

    bias: [(heads + 2 kv_heads) * head_dim] or None. positions, slot_mapping: int64 [tokens] (slots must be
    in range: the caller's responsibility). inv_freq: fp32 [rotary_dim / 2]. Pools:
    [num_blocks, block_size, kv_heads, head_dim] in qkv's dtype, updated in place.
    M-RoPE: positions int64 [rows, tokens] (rows 2 or 3: t, h, w; any row stride) and mrope_section the
    `rows` run lengths of frequencies each row drives, summing to rotary_dim / 2 (GLM-4.1V: (8, 12, 12)).
    """
    for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotary works on pairs), got {head_dim}")
    check_tensor("qkv", qkv, ndim=2)
    T, width = qkv.shape
    total_heads = num_heads + 2 * num_kv_heads
    if width != total_heads * head_dim:
        raise ValueError(f"qkv has width {width} but (num_heads + 2 * num_kv_heads) * head_dim = "
                         f"{total_heads * head_dim}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, like=qkv)
        check_shape("bias", bias, (width,))
    _check_index("slot_mapping", slot_mapping, T)
    check_tensor("inv_freq", inv_freq, ndim=1, dtypes=(torch.float32,))
    if 2 * inv_freq.numel() > head_dim:
        raise ValueError(f"inv_freq has {inv_freq.numel()} frequencies: rotary_dim {2 * inv_freq.numel()} "
                         f"> head_dim {head_dim}")
    section_1, section_2 = _check_positions(positions, mrope_section, T, inv_freq.numel())
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        check_tensor(name, pool, ndim=4, like=qkv)
        if pool.shape[2:] != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                             f"got {tuple(pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool has shape {tuple(v_pool.shape)} but k_pool has {tuple(k_pool.shape)}")
    if q_out is None:
        q_out = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    check_tensor("q_out", q_out, ndim=3, like=qkv)
    check_shape("q_out", q_out, (T, num_heads, head_dim))
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping), ("inv_freq", inv_freq)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {qkv.device}")
    if T == 0:
        return q_out
    heads, half_block, warps = _launch_config(total_heads, head_dim)
    grid = (T, triton.cdiv(total_heads, heads))
    qkv_rope_cache_kernel[grid](
        qkv, bias if bias is not None else qkv, positions, slot_mapping, inv_freq, q_out, k_pool, v_pool,
        num_heads, num_kv_heads, k_pool.shape[1], qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        positions.stride(0) if mrope_section is not None else 0,
        HEAD_DIM=head_dim, ROT_PAIRS=inv_freq.numel(), HAS_BIAS=bias is not None, HEADS=heads,
        HALF_BLOCK=half_block, MROPE=mrope_section is not None, SECTION_1=section_1, SECTION_2=section_2,
        num_warps=warps)
    return q_out


def reference_qkv_rope_cache_write(qkv, bias, positions, slot_mapping, inv_freq, k_pool, v_pool,
                                   num_heads, num_kv_heads, head_dim, mrope_section=None):
    """Eager: bias add and apply_rotary in the model dtype (as GlmAttention), then index-put into the pools.
    The angles are RotaryEmbedding's (autoglm_fast/reference/glm.py), M-RoPE's section select included."""
    from autoglm_fast.reference.glm import apply_rotary
    T = qkv.shape[0]
    x = qkv + bias if bias is not None else qkv
    q, k, v = x.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    freqs = positions.float()[..., None] * inv_freq  # [T, rotary_dim / 2], or [rows, T, rotary_dim / 2]
    if mrope_section is not None:  # run r of the frequencies from row r
        freqs = torch.cat([run[r] for r, run in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)
    freqs = freqs.repeat_interleave(2, dim=-1)[None]  # [1, T, rotary_dim]
    cos, sin = freqs.cos(), freqs.sin()
    q = apply_rotary(q.reshape(1, T, num_heads, head_dim), cos, sin)[0]
    k = apply_rotary(k.reshape(1, T, num_kv_heads, head_dim), cos, sin)[0]
    bs = k_pool.shape[1]
    k_pool[slot_mapping // bs, slot_mapping % bs] = k
    v_pool[slot_mapping // bs, slot_mapping % bs] = v.reshape(T, num_kv_heads, head_dim)
    return q


def compile_specs():
    """The launches at GLM-4-9B's shapes (compile matrix): 28 q / 2 KV heads of 128, rotary_dim 64, pools
    [blocks, 32, 2, 128], contiguous qkv [tokens, 4096] and q_out [tokens, 28, 128]; and GLM-4.1V's M-RoPE
    variant: 32 q / 2 KV heads of 128 (qkv [tokens, 4608]), rotary_dim 64, mrope_section (8, 12, 12), bias."""
    from .specs import CompileSpec, TensorArg
    head_dim, rot_pairs, block_size, num_kv_heads = 128, 32, 32, 2
    pool = {"b": block_size * num_kv_heads * head_dim, "s": num_kv_heads * head_dim, "h": head_dim}
    specs = []
    # (heads, mrope_section, bias variants): the 1-row launches of GLM-4-9B, the M-RoPE ones of GLM-4.1V.
    for num_heads, section, biases in ((28, None, (True, False)), (32, (8, 12, 12), (True,))):
        heads, half_block, warps = _launch_config(num_heads + 2 * num_kv_heads, head_dim)
        mrope = {"MROPE": section is not None, "SECTION_1": section[0] if section else 0,
                 "SECTION_2": section[0] + section[1] if section else 0,
                 "stride_pr": 4096 if section else 0}  # [3, tokens] rows (not specialized: any value)
        for dtype in ("fp16", "bf16"):
            t = TensorArg(dtype)
            args = {"qkv_ptr": t, "pos_ptr": TensorArg("i64"), "slot_ptr": TensorArg("i64"),
                    "inv_freq_ptr": TensorArg("fp32"), "q_ptr": t, "k_ptr": t, "v_ptr": t, "num_heads": num_heads,
                    "num_kv_heads": num_kv_heads, "block_size": block_size,
                    "stride_xt": (num_heads + 2 * num_kv_heads) * head_dim, "stride_qt": num_heads * head_dim,
                    "stride_qh": head_dim, **{f"stride_{c}{d}": n for c in "kv" for d, n in pool.items()},
                    "HEAD_DIM": head_dim, "ROT_PAIRS": rot_pairs, "HEADS": heads, "HALF_BLOCK": half_block, **mrope}
            for has_bias in biases:
                rope = f"mrope{'/'.join(map(str, section))}" if section else "rot64"
                specs.append(CompileSpec("qkv_rope_cache", qkv_rope_cache_kernel,
                                         {**args, "bias_ptr": t, "HAS_BIAS": has_bias}, num_warps=warps,
                                         label=f"{dtype} {num_heads}/2x128 {rope} {'bias' if has_bias else 'no bias'}"
                                               f" w{warps}"))
    return specs
