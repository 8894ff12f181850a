"""QKV epilogue: bias add + GLM partial interleaved rotary on q and k + paged K/V cache write, one pass.

The fused q|k|v GEMM output (no bias) is read once per token; q goes to `q_out` [tokens, heads, head_dim],
k and v go straight into the pools [num_blocks, block_size, kv_heads, head_dim] at `slot_mapping[token]`
(no intermediate K/V tensors, the pools are written in place through their strides). Every head row is
loaded and stored as contiguous vectors; the interleaved pairs are split apart in registers. cos / sin come
from a table indexed by position (`rope_cos_sin_cache`, vLLM's cos_sin_cache layout: fp32 [max_positions,
rotary_dim], cos in the first half of a row, sin in the second); the rotation is done in fp32.
M-RoPE (GLM-4.1V): positions get a row per axis (t, h, w) and `mrope_section` splits the frequencies into
consecutive runs, each run's angles taken from its row's position (a constexpr-specialized variant).
Eager reference: `reference_qkv_rope_cache_write` (autoglm_fast/reference/glm.py's apply_rotary math).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import check_shape, check_tensor

ELEMENTS_PER_PROGRAM = 1024  # a program takes this many channels of one token: 8 heads of 128


@triton.jit
def _table_run(cos_sin_ptr, pos_ptr, num_positions, i, run, cos, sin, ROT_PAIRS: tl.constexpr):
    """cos / sin of the frequencies i in `run` from the table row at *pos_ptr; the other lanes kept. The index is
    clamped only for memory safety: callers keep positions below num_positions (the engine bounds them by
    max_model_len), and checking them would cost a host sync."""
    row = cos_sin_ptr + tl.minimum(tl.maximum(tl.load(pos_ptr), 0), num_positions - 1) * (2 * ROT_PAIRS)
    return (tl.where(run, tl.load(row + i, mask=run, other=1.0), cos),
            tl.where(run, tl.load(row + ROT_PAIRS + i, mask=run, other=0.0), sin))


# stride_pr (M-RoPE's row stride) follows the step's token count: not specialized, so it adds no variants.
@triton.jit(do_not_specialize=["stride_pr"])
def qkv_rope_cache_kernel(qkv_ptr, bias_ptr, pos_ptr, slot_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr,
                          num_heads, num_kv_heads, block_size, num_positions, stride_xt, stride_qt, stride_qh,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_pr,
                          HEAD_DIM: tl.constexpr, ROT_PAIRS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HEADS: tl.constexpr, HEAD_BLOCK: tl.constexpr, MROPE: tl.constexpr,
                          SECTION_1: tl.constexpr, SECTION_2: tl.constexpr):
    # Program (token, group): heads [group * HEADS, +HEADS) of the row's q | k | v heads, each a contiguous
    # row of HEAD_DIM channels loaded and stored as whole vectors; the interleaved pairs (x0, x1), (x2, x3)...
    # are split apart in registers, so no access has a stride of 2.
    tok = tl.program_id(0)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    c = tl.arange(0, HEAD_BLOCK)
    i = tl.arange(0, HEAD_BLOCK // 2)  # pair index = frequency index
    n_qk = num_heads + num_kv_heads
    valid = (h < n_qk + num_kv_heads)[:, None]
    if HEAD_BLOCK != HEAD_DIM:  # only then a channel mask: it would split the vectors of a power-of-2 head
        valid = valid & (c < HEAD_DIM)[None, :]
    col = h[:, None] * HEAD_DIM + c[None, :]
    x = tl.load(qkv_ptr + tok.to(tl.int64) * stride_xt + col, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + col, mask=valid, other=0.0).to(tl.float32)
    even, odd = tl.split(x.reshape(HEADS, HEAD_BLOCK // 2, 2))

    # cos | sin from the table rows at the token's position(s); identity past rotary_dim.
    in_rot = i < ROT_PAIRS
    cos, sin = tl.full([HEAD_BLOCK // 2], 1.0, tl.float32), tl.zeros([HEAD_BLOCK // 2], tl.float32)
    if MROPE:
        # Frequencies [0, SECTION_1) follow row 0 (t), [SECTION_1, SECTION_2) row 1 (h), the rest row 2 (w);
        # with 2 rows SECTION_2 == ROT_PAIRS. Each row's entries are loaded only over its run: whole vectors
        # where the runs are multiples of 4, as GLM-4.1V's 8 | 12 | 12.
        cos, sin = _table_run(cos_sin_ptr, pos_ptr + tok, num_positions, i, i < SECTION_1, cos, sin, ROT_PAIRS)
        cos, sin = _table_run(cos_sin_ptr, pos_ptr + stride_pr + tok, num_positions, i,
                              (i >= SECTION_1) & (i < SECTION_2), cos, sin, ROT_PAIRS)
        if SECTION_2 < ROT_PAIRS:
            cos, sin = _table_run(cos_sin_ptr, pos_ptr + 2 * stride_pr + tok, num_positions, i,
                                  (i >= SECTION_2) & in_rot, cos, sin, ROT_PAIRS)
    else:
        cos, sin = _table_run(cos_sin_ptr, pos_ptr + tok, num_positions, i, in_rot, cos, sin, ROT_PAIRS)
    cos, sin = cos[None, :], sin[None, :]
    rot = (h < n_qk)[:, None] & in_rot[None, :]  # q and k heads, first rotary_dim channels; the rest copied
    out = tl.join(tl.where(rot, even * cos - odd * sin, even),
                  tl.where(rot, odd * cos + even * sin, odd)).reshape(HEADS, HEAD_BLOCK)

    is_q = valid & (h < num_heads)[:, None]
    q_dst = q_ptr + tok.to(tl.int64) * stride_qt + h[:, None] * stride_qh + c[None, :]
    tl.store(q_dst, out.to(q_ptr.dtype.element_ty), mask=is_q)
    slot = tl.load(slot_ptr + tok)  # int64: block * stride_kb stays exact in huge pools
    block, offset = slot // block_size, slot % block_size
    kv = h - num_heads
    is_k = valid & ((kv >= 0) & (kv < num_kv_heads))[:, None]
    k_dst = k_ptr + block * stride_kb + offset * stride_ks + kv[:, None] * stride_kh + c[None, :]
    tl.store(k_dst, out.to(k_ptr.dtype.element_ty), mask=is_k)
    vh = kv - num_kv_heads
    is_v = valid & (vh >= 0)[:, None]
    v_dst = v_ptr + block * stride_vb + offset * stride_vs + vh[:, None] * stride_vh + c[None, :]
    tl.store(v_dst, out.to(v_ptr.dtype.element_ty), mask=is_v)


def _launch_config(total_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(HEADS per program, HEAD_BLOCK, num_warps) for a head layout: 8 channels a thread, one 16-byte vector
    of a 16-bit head row."""
    head_block = triton.next_power_of_2(head_dim)
    heads = min(triton.next_power_of_2(total_heads), max(1, ELEMENTS_PER_PROGRAM // head_block))
    return heads, head_block, max(1, min(8, heads * head_block // 256))


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """fp32 [max_positions, rotary_dim]: row p is cos(p * inv_freq) | sin(p * inv_freq), the angles computed as
    RotaryEmbedding does (fp32 positions.float() * inv_freq, torch cos / sin in fp32). inv_freq: fp32
    [rotary_dim / 2] (autoglm_fast/reference/glm.py's rotary_inv_freq); the table is on its device."""
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dtype != torch.float32 or inv_freq.dim() != 1:
        raise TypeError(f"inv_freq must be a 1-D fp32 tensor, got {getattr(inv_freq, 'dtype', type(inv_freq))} of "
                        f"shape {tuple(getattr(inv_freq, 'shape', ()))}")
    if not isinstance(max_positions, int) or isinstance(max_positions, bool) or max_positions < 1:
        raise ValueError(f"max_positions must be a positive int, got {max_positions!r}")
    angles = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


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
                         f"{rot_pairs} (half cos_sin_cache's width)")
    return mrope_section[0], (mrope_section[0] + mrope_section[1] if rows == 3 else rot_pairs)


def qkv_rope_cache_write(qkv: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                         slot_mapping: torch.Tensor, cos_sin_cache: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                         q_out: torch.Tensor | None = None,
                         mrope_section: tuple[int, ...] | None = None) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim] -> q [tokens, heads, head_dim]; k, v written to the pools.

    bias: [(heads + 2 kv_heads) * head_dim] or None. positions, slot_mapping: int64 [tokens]; both must be in
    range, the caller's responsibility (no host sync here): slots below num_blocks * block_size, positions below
    cos_sin_cache's length (the engine bounds them by max_model_len; out-of-range ones are clamped, not
    faulted). cos_sin_cache: contiguous fp32 [max_positions, rotary_dim], `rope_cos_sin_cache(inv_freq,
    max_positions)`. Pools: [num_blocks, block_size, kv_heads, head_dim] in qkv's dtype, updated in place.
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
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,))
    max_positions, rotary_dim = cos_sin_cache.shape
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or max_positions < 1:
        raise ValueError(f"cos_sin_cache must be [max_positions >= 1, rotary_dim] with rotary_dim even and at most "
                         f"head_dim {head_dim}, got shape {tuple(cos_sin_cache.shape)}")
    if not cos_sin_cache.is_contiguous():
        raise ValueError(f"cos_sin_cache must be contiguous, got strides {cos_sin_cache.stride()}")
    section_1, section_2 = _check_positions(positions, mrope_section, T, rotary_dim // 2)
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
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping), ("cos_sin_cache", cos_sin_cache)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {qkv.device}")
    if T == 0:
        return q_out
    heads, head_block, warps = _launch_config(total_heads, head_dim)
    grid = (T, triton.cdiv(total_heads, heads))
    qkv_rope_cache_kernel[grid](
        qkv, bias if bias is not None else qkv, positions, slot_mapping, cos_sin_cache, q_out, k_pool, v_pool,
        num_heads, num_kv_heads, k_pool.shape[1], max_positions, qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        positions.stride(0) if mrope_section is not None else 0,
        HEAD_DIM=head_dim, ROT_PAIRS=rotary_dim // 2, HAS_BIAS=bias is not None, HEADS=heads,
        HEAD_BLOCK=head_block, MROPE=mrope_section is not None, SECTION_1=section_1, SECTION_2=section_2,
        num_warps=warps)
    return q_out


def reference_qkv_rope_cache_write(qkv, bias, positions, slot_mapping, cos_sin_cache, k_pool, v_pool,
                                   num_heads, num_kv_heads, head_dim, mrope_section=None):
    """Eager: bias add and apply_rotary in the model dtype (as GlmAttention), then index-put into the pools.
    cos / sin are the table's rows at the positions (M-RoPE: run r of the frequencies from row r's position)."""
    from autoglm_fast.reference.glm import apply_rotary
    T = qkv.shape[0]
    x = qkv + bias if bias is not None else qkv
    q, k, v = x.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rotary_dim / 2], or [rows, T, rotary_dim / 2]
    if mrope_section is not None:
        cos, sin = (torch.cat([run[r] for r, run in enumerate(t.split(list(mrope_section), dim=-1))], dim=-1)
                    for t in (cos, sin))
    cos, sin = (t.repeat_interleave(2, dim=-1)[None] for t in (cos, sin))  # [1, T, rotary_dim]
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
    head_dim, rot_pairs, block_size, num_kv_heads, max_positions = 128, 32, 32, 2, 32768
    pool = {"b": block_size * num_kv_heads * head_dim, "s": num_kv_heads * head_dim, "h": head_dim}
    specs = []
    # (heads, mrope_section, bias variants): the 1-row launches of GLM-4-9B, the M-RoPE ones of GLM-4.1V.
    for num_heads, section, biases in ((28, None, (True, False)), (32, (8, 12, 12), (True,))):
        heads, head_block, warps = _launch_config(num_heads + 2 * num_kv_heads, head_dim)
        mrope = {"MROPE": section is not None, "SECTION_1": section[0] if section else 0,
                 "SECTION_2": section[0] + section[1] if section else 0,
                 "stride_pr": 4096 if section else 0}  # [3, tokens] rows (not specialized: any value)
        for dtype in ("fp16", "bf16"):
            t = TensorArg(dtype)
            args = {"qkv_ptr": t, "pos_ptr": TensorArg("i64"), "slot_ptr": TensorArg("i64"),
                    "cos_sin_ptr": TensorArg("fp32"), "q_ptr": t, "k_ptr": t, "v_ptr": t, "num_heads": num_heads,
                    "num_kv_heads": num_kv_heads, "block_size": block_size, "num_positions": max_positions,
                    "stride_xt": (num_heads + 2 * num_kv_heads) * head_dim, "stride_qt": num_heads * head_dim,
                    "stride_qh": head_dim, **{f"stride_{c}{d}": n for c in "kv" for d, n in pool.items()},
                    "HEAD_DIM": head_dim, "ROT_PAIRS": rot_pairs, "HEADS": heads, "HEAD_BLOCK": head_block, **mrope}
            for has_bias in biases:
                rope = f"mrope{'/'.join(map(str, section))}" if section else "rot64"
                specs.append(CompileSpec("qkv_rope_cache", qkv_rope_cache_kernel,
                                         {**args, "bias_ptr": t, "HAS_BIAS": has_bias}, num_warps=warps,
                                         label=f"{dtype} {num_heads}/2x128 {rope} {'bias' if has_bias else 'no bias'}"
                                               f" w{warps}"))
    return specs
