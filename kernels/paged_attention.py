"""Causal GQA attention over the paged KV cache (autoglm_fast/paged_cache.py) for the GLM backbone.

The step's new K/V are already in the pools; every query reads keys 0..seq_len-1 of its sequence
straight from the pages, gathering the page of each key through the block table (no copy of a pool).
Query i of a sequence with q_len new tokens sits at position seq_len - q_len + i.

- Prefill / chunked prefill: flash attention (online softmax in the log2 domain, fp32 accumulate)
  per (query head, BLOCK_M query rows, sequence); keys below the block's first query go through an
  unmasked loop, the causal diagonal through a masked one. Query head h reads KV head h // group.
- Decode (one new token per sequence): flash-decoding. One program per (sequence, KV head, split)
  holds the whole GQA group as one tile (padded to >= 16 rows for tl.dot) so each K/V page is read
  once per group; splits write (o, lse) partials that a small kernel merges.
Eager reference: `reference_paged_attention` below (decode is its q_len = 1 case).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .flash import eager_probs, softmax_step
from .utils import autotune, check_shape, check_tensor, compute_dtype

# At head_dim 128 none spills on sm_80/89/90 when compiled as launched (pointers and strides divisible by 16);
# 64x64 with 4 warps did (stack frame on sm_89). The first is the interpreter's.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),  # short chunks
]
DECODE_CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)  # fixed: split lengths round to BLOCK_N
MIN_SPLIT_TOKENS, MAX_SPLITS = 256, 64
_LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    if MASK_ROWS:
        x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif PAD_D:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend(acc, l_i, m_i, q, q_pos, k_base, v_base, bt_row, lo, hi, qk_scale, stride_kb, stride_kt, stride_vb,
            stride_vt, offs_d, mask_d, MASKED: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
            IEEE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update with keys [lo, hi) of one sequence. MASKED: the range may end mid-tile and,
    with CAUSAL, cross the diagonal; unmasked ranges are whole tiles every query row sees."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = offs_n < hi
        if MASKED:
            page = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=ok, other=0)
        else:
            page = tl.load(bt_row + offs_n // BLOCK_SIZE)
        page = page.to(tl.int64)  # page * stride_block passes 2^31 in a large pool
        slot = offs_n % BLOCK_SIZE
        k = _load_tile(k_base + page[:, None] * stride_kb + slot[:, None] * stride_kt + offs_d[None, :], ok, mask_d,
                       MASKED, PAD_D)
        v = _load_tile(v_base + page[:, None] * stride_vb + slot[:, None] * stride_vt + offs_d[None, :], ok, mask_d,
                       MASKED, PAD_D)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2 domain: qk_scale has log2(e) folded in
        if MASKED:
            valid = ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(valid, s, float("-inf"))
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, IEEE)
    return acc, l_i, m_i


@autotune(PREFILL_CONFIGS, key=["Q_BUCKET", "HEAD_DIM"])
@triton.jit
def paged_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, Q_BUCKET, stride_qt, stride_qh,
                         stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_bt, qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Heads vary fastest: programs running together share their sequence's K/V pages in L2.
    h, pid_m, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if pid_m * BLOCK_M >= q_len:  # the grid covers the longest query chunk; shorter ones stop here
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first = seq_len - q_len + pid_m * BLOCK_M  # position of the block's first query
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows_ok = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=rows_ok[:, None] & mask_d[None, :], other=0.0)
    kv_head = h // GROUP
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base, v_base = k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite: a fully masked tile gives p = 0, not NaN
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    full = (first + 1) // BLOCK_N * BLOCK_N  # whole tiles at or before the first query: no mask at all
    kv_end = tl.minimum(first + BLOCK_M, seq_len)  # one past the last key the last query sees
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, first + tl.arange(0, BLOCK_M), k_base, v_base, bt_row, 0, full,
                            qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, offs_d, mask_d, False, False,
                            BLOCK_D != HEAD_DIM, IEEE, BLOCK_SIZE, BLOCK_N)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, first + tl.arange(0, BLOCK_M), k_base, v_base, bt_row, full, kv_end,
                            qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, offs_d, mask_d, True, True,
                            BLOCK_D != HEAD_DIM, IEEE, BLOCK_SIZE, BLOCK_N)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=rows_ok[:, None] & mask_d[None, :])


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, bt_ptr, seq_lens_ptr, split_len,
                        num_splits, stride_qs, stride_qh, stride_os, stride_oh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_bt, qk_scale, NUM_HEADS: tl.constexpr,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * split_len
    if lo >= seq_len:  # a shorter sequence than the batch's longest: the merge skips this split
        return
    hi = tl.minimum(lo + split_len, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    rows_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rows_ok[:, None] & mask_d[None, :], other=0.0)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base, v_base = k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh
    m_i = tl.full((GROUP_PAD,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    full = lo + (hi - lo) // BLOCK_N * BLOCK_N  # the one new token sees every key: only the tail is masked
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, rows, k_base, v_base, bt_row, lo, full, qk_scale, stride_kb, stride_kt,
                            stride_vb, stride_vt, offs_d, mask_d, False, False, BLOCK_D != HEAD_DIM, IEEE,
                            BLOCK_SIZE, BLOCK_N)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, rows, k_base, v_base, bt_row, full, hi, qk_scale, stride_kb, stride_kt,
                            stride_vb, stride_vt, offs_d, mask_d, True, False, BLOCK_D != HEAD_DIM, IEEE,
                            BLOCK_SIZE, BLOCK_N)
    out = acc / l_i[:, None]  # l_i >= 1 for real rows: the split holds at least one key
    mask = rows_ok[:, None] & mask_d[None, :]
    if SPLIT:  # partials [num_seqs, num_splits, num_heads, (head_dim)] in fp32
        part = (seq.to(tl.int64) * num_splits + split) * NUM_HEADS + heads
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=rows_ok)
    else:
        o_ptrs = o_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def paged_decode_reduce_kernel(part_o_ptr, part_lse_ptr, o_ptr, seq_lens_ptr, split_len, num_splits, stride_os,
                               stride_oh, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the non-empty splits of one (sequence, KV group): o = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)."""
    seq, kv_head = tl.program_id(0), tl.program_id(1)
    used = tl.cdiv(tl.load(seq_lens_ptr + seq), split_len)  # splits past the sequence's end were never written
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    rows_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m_i = tl.full((GROUP_PAD,), -1.0e30, dtype=tl.float32)  # finite, so merging never computes inf - inf
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    for split in range(0, used):
        part = (seq.to(tl.int64) * num_splits + split) * NUM_HEADS + heads
        lse = tl.load(part_lse_ptr + part, mask=rows_ok, other=-1.0e30)
        o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha, w = tl.exp2(m_i - m_new), tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


# ---- launchers ------------------------------------------------------------------------------------
def _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, num_seqs, max_seq_len):
    """Shared checks; returns (num_heads, num_kv_heads, head_dim, block_size)."""
    check_tensor("q", q, ndim=3)
    check_tensor("k_pool", k_pool, ndim=4, like=q)
    check_tensor("v_pool", v_pool, ndim=4, like=q)
    check_shape("v_pool", v_pool, tuple(k_pool.shape))
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, pool_dim = k_pool.shape
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"q has {num_heads} heads, not a multiple of the cache's {num_kv_heads} KV heads")
    if head_dim != pool_dim:
        raise ValueError(f"q's head_dim {head_dim} does not match the cache's head_dim {pool_dim}")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), like=q)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), like=q)
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have one row per sequence ({num_seqs}), got {tuple(block_tables.shape)}")
    if max_seq_len is None and num_seqs > 0:
        max_seq_len = int(seq_lens.max())
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(f"block table too short: block_tables has {block_tables.shape[1]} blocks of {block_size} "
                         f"tokens per sequence, max_seq_len is {max_seq_len}")
    return num_heads, num_kv_heads, head_dim, block_size


def _output(out, q, shape):
    if out is None:
        return torch.empty(shape, device=q.device, dtype=q.dtype)
    check_tensor("out", out, ndim=3, like=q)
    check_shape("out", out, shape)
    return out


def _common_args(k_pool, v_pool, block_tables, head_dim, scale):
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return dict(stride_kb=k_pool.stride(0), stride_kt=k_pool.stride(1), stride_kh=k_pool.stride(2),
                stride_vb=v_pool.stride(0), stride_vt=v_pool.stride(1), stride_vh=v_pool.stride(2),
                stride_bt=block_tables.stride(0), qk_scale=scale * _LOG2E, HEAD_DIM=head_dim,
                BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=k_pool.shape[1],
                IEEE=k_pool.dtype == torch.float32)


def paged_prefill_attention(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, max_query_len: int,
                            scale: float | None = None, out: torch.Tensor | None = None,
                            max_seq_len: int | None = None) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] (rows of all sequences, per query_start_loc) -> causal attention
    over each sequence's cached keys, [num_tokens, num_heads, head_dim]. max_seq_len (meta.max_seq_len)
    checks the block table; when None it is read from seq_lens (a host sync)."""
    num_seqs = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) and seq_lens.dim() == 1 else -1
    num_heads, num_kv_heads, head_dim, _ = _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, num_seqs,
                                                         max_seq_len)
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=(torch.int32,), like=q)
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    if not isinstance(max_query_len, int) or not 1 <= max_query_len <= max(1, q.shape[0]):
        raise ValueError(f"max_query_len must be an int in [1, num_tokens={q.shape[0]}], got {max_query_len!r}")
    out = _output(out, q, tuple(q.shape))
    if q.shape[0] == 0:
        return out
    grid = lambda meta: (num_heads, triton.cdiv(max_query_len, meta["BLOCK_M"]), num_seqs)  # noqa: E731
    paged_prefill_kernel[grid](q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc,
                               min(triton.next_power_of_2(max_query_len), 4096), q.stride(0), q.stride(1),
                               out.stride(0), out.stride(1), GROUP=num_heads // num_kv_heads,
                               **_common_args(k_pool, v_pool, block_tables, head_dim, scale))
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device) -> int:
    """Splits of the context per (sequence, KV head): enough programs for ~2 waves over the SMs
    (2 * SMs / (num_seqs * num_kv_heads)), but every split >= MIN_SPLIT_TOKENS keys (so its partial
    write and the merge stay small next to the K/V it reads) and at most MAX_SPLITS. 1 when short."""
    want = triton.cdiv(2 * _sm_count(torch.device(device)), max(1, num_seqs * num_kv_heads))
    return max(1, min(want, MAX_SPLITS, max_seq_len // MIN_SPLIT_TOKENS))


def paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, max_seq_len: int, scale: float | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [num_seqs, num_heads, head_dim] (each sequence's one new token, already in the cache) ->
    attention over its seq_lens[s] cached keys, [num_seqs, num_heads, head_dim]. num_splits None:
    `decode_num_splits`; it is rounded so that every split is a whole number of key tiles."""
    num_seqs = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 3 else -1
    num_heads, num_kv_heads, head_dim, _ = _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, num_seqs,
                                                         max_seq_len)
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    out = _output(out, q, tuple(q.shape))
    if num_seqs == 0:
        return out
    block_n = DECODE_CONFIG.kwargs["BLOCK_N"]
    split_len = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_len)  # no split entirely past the longest sequence
    group = num_heads // num_kv_heads
    consts = dict(NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)))
    args = _common_args(k_pool, v_pool, block_tables, head_dim, scale)
    part_o = part_lse = out  # unused without splits
    if num_splits > 1:
        part_o = torch.empty(num_seqs, num_splits, num_heads, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_splits, num_heads, device=q.device, dtype=torch.float32)
    paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_pool, v_pool, out, part_o, part_lse, block_tables, seq_lens, split_len, num_splits, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), SPLIT=num_splits > 1, **consts, **args, **DECODE_CONFIG.kwargs,
        num_warps=DECODE_CONFIG.num_warps, num_stages=DECODE_CONFIG.num_stages)
    if num_splits > 1:
        paged_decode_reduce_kernel[(num_seqs, num_kv_heads)](
            part_o, part_lse, out, seq_lens, split_len, num_splits, out.stride(0), out.stride(1), **consts,
            HEAD_DIM=head_dim, BLOCK_D=args["BLOCK_D"], num_warps=4)
    return out


def reference_paged_attention(q, k_pool, v_pool, block_tables, seq_lens, query_start_loc, scale=None):
    """Eager: gather each sequence's keys from its pages, causal softmax in fp32 (fp64 for fp64 q), the
    probabilities rounded to q's dtype as eager attention rounds them, each KV head shared by its group of
    query heads."""
    num_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    c = compute_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=c, device=q.device)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        pos = torch.arange(seq_len, device=q.device)
        pages = block_tables[s, pos // block_size].long()
        k, v = k_pool[pages, pos % block_size].to(c), v_pool[pages, pos % block_size].to(c)  # [keys, kv, d]
        qg = q[a:b].to(c).unflatten(1, (num_kv_heads, -1))  # query head h reads KV head h // group
        scores = torch.einsum("ngzd,kgd->gznk", qg, k) * scale
        q_pos = seq_len - (b - a) + torch.arange(b - a, device=q.device)
        scores = scores.masked_fill(pos > q_pos[:, None], float("-inf"))
        out[a:b] = torch.einsum("gznk,kgd->ngzd", eager_probs(scores, q.dtype), v).flatten(1, 2)
    return out.to(q.dtype)


def compile_specs():
    """Every config the launchers can pick, at GLM-4-9B's launches (compile matrix): 28 query / 2 KV heads of 128,
    pools [blocks, 32, 2, 128], q and out contiguous [tokens, 28, 128]. Prefill: one 300-token prompt (a block
    table 10 pages wide). Decode (CUDA graphs: tables cdiv(4096, 32) = 256 pages wide): a 300-token context in
    one split, and a 4096-token one in 16 splits of 256 (decode_num_splits on 132 SMs), then their merge."""
    from .specs import CompileSpec, TensorArg
    num_heads, num_kv_heads, head_dim, block_size = 28, 2, 128, 32
    group = num_heads // num_kv_heads
    pool = {"b": block_size * num_kv_heads * head_dim, "t": num_kv_heads * head_dim, "h": head_dim}
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_SIZE": block_size, "IEEE": False}
    decode = {"NUM_HEADS": num_heads, "GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group))}
    specs = []
    for dtype in ("fp16", "bf16"):
        t, i32, f32 = TensorArg(dtype), TensorArg("i32"), TensorArg("fp32")
        common = {"q_ptr": t, "k_ptr": t, "v_ptr": t, "o_ptr": t, "bt_ptr": i32, "seq_lens_ptr": i32,
                  **{f"stride_{c}{d}": n for c in "kv" for d, n in pool.items()},
                  "qk_scale": _LOG2E / math.sqrt(head_dim), **consts}
        args = {**common, "qsl_ptr": i32, "Q_BUCKET": 512, "stride_qt": num_heads * head_dim, "stride_qh": head_dim,
                "stride_ot": num_heads * head_dim, "stride_oh": head_dim, "stride_bt": 10, "GROUP": group}
        for cfg in PREFILL_CONFIGS:
            specs.append(CompileSpec.from_config(
                "paged_prefill_attention", paged_prefill_kernel, args, cfg,
                label=f"{dtype} {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"))
        rows = {"stride_os": num_heads * head_dim, "stride_oh": head_dim, **decode}
        for splits, split_len in ((1, 320), (16, 256)):
            part_o, part_lse = (f32, f32) if splits > 1 else (t, t)  # unused without splits: the launcher passes out
            args = {**common, **rows, "part_o_ptr": part_o, "part_lse_ptr": part_lse, "split_len": split_len,
                    "num_splits": splits, "stride_qs": num_heads * head_dim, "stride_qh": head_dim, "stride_bt": 256,
                    "SPLIT": splits > 1}
            specs.append(CompileSpec.from_config(
                "paged_decode_attention", paged_decode_kernel, args, DECODE_CONFIG,
                label=f"{dtype} {f'{splits} splits' if splits > 1 else 'single'} {DECODE_CONFIG.kwargs['BLOCK_N']} "
                      f"w{DECODE_CONFIG.num_warps} s{DECODE_CONFIG.num_stages}"))
        args = {**rows, "part_o_ptr": f32, "part_lse_ptr": f32, "o_ptr": t, "seq_lens_ptr": i32, "split_len": 256,
                "num_splits": 16, "HEAD_DIM": head_dim, "BLOCK_D": head_dim}
        specs.append(CompileSpec("paged_decode_reduce", paged_decode_reduce_kernel, args, num_warps=4,
                                 label=f"{dtype} 16 splits w4"))
    return specs
