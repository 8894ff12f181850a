"""Causal GQA attention over the paged KV cache (autoglm_fast/paged_cache.py) for the GLM backbone.

The step's new K/V are already in the pools; every query reads keys 0..seq_len-1 of its sequence
straight from the pages, gathering the page of each key through the block table (no copy of a pool).
Query i of a sequence with q_len new tokens sits at position seq_len - q_len + i.

- Prefill / chunked prefill: flash attention (online softmax in the log2 domain, fp32 accumulate)
  per (query head, BLOCK_M query rows, sequence); keys below the block's first query go through an
  unmasked loop, the causal diagonal through a masked one. Query head h reads KV head h // group. The
  longest query blocks run first; the config comes from an offline-tuned table (kernels/tuned/, per GPU
  target and q bucket), not from a benchmark at launch.
- Decode (one new token per sequence): flash-decoding, in paged_decode.py (it shares `_attend` and the
  input checks from here).
Eager reference: `reference_paged_attention` below (decode is its q_len = 1 case).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash import eager_probs, softmax_step
from .utils import (TARGETS, TableTuned, check_shape, check_tensor, compute_dtype, config_name, device_target,
                    tuned_table)

# At head_dim 128 none spills on sm_80/89/90 when compiled as launched (pointers and strides divisible by 16);
# 64x64 with 4 warps did (stack frame on sm_89). The first is the interpreter's. BLOCK_M >= 64 (4+ warps)
# compiles to wgmma on sm_90; 32x64 to mma.sync everywhere.
PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),  # short chunks
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),  # sm_90 only: spills on sm_80/89
]
PREFILL_BY_NAME = {config_name(c): c for c in PREFILL_CONFIGS}
# The targets each config is offered on (fits shared memory, no spills at head_dim <= 128; compile_specs
# compiles each for exactly these). 128x128 spills on sm_80/89 (255 registers), fits sm_90's 227 KB.
PREFILL_TARGETS = {**{name: TARGETS for name in PREFILL_BY_NAME}, "128x128 w8 s3": ("sm_90",)}
MAX_Q_BUCKET = 4096
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


@triton.jit
def _paged_prefill(q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, stride_qt, stride_qh, stride_ot,
                   stride_oh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Heads vary fastest: programs running together share their sequence's K/V pages in L2. Query blocks run
    # last-first: under the causal mask later blocks see more keys, and starting the longest ones first keeps
    # them from straggling in the final wave.
    h, seq = tl.program_id(0), tl.program_id(2)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
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


paged_prefill_kernel = TableTuned(_paged_prefill, PREFILL_CONFIGS)


# ---- config choice: an offline-tuned table (kernels/tuned/paged_prefill.json; `autoglm-fast bench --tune`) ----
def prefill_q_bucket(max_query_len: int) -> int:
    """The table's key for a launch: max_query_len rounded up to a power of two, at most MAX_Q_BUCKET."""
    return min(triton.next_power_of_2(max_query_len), MAX_Q_BUCKET)


def default_prefill_config(target: str, q_bucket: int, head_dim: int) -> str:
    """The config a launch takes where the table has no entry. Educated guesses, not measurements: short
    chunks want small query tiles (more programs over the SMs, little masked work); mid-sized ones 64-row
    tiles (28 heads x 128-row tiles would leave most of the SMs idle); long ones the biggest tile that fits
    the target. Above head_dim 128 the configs' shared memory was never checked: the smallest tile."""
    if head_dim > 128:
        return config_name(PREFILL_CONFIGS[0])
    if q_bucket <= 64:
        return "32x64 w4 s3"
    if q_bucket <= 512:
        return "64x32 w4 s2"
    return "128x128 w8 s3" if target == "sm_90" else "128x64 w8 s2"


def choose_prefill_config(target: str, q_bucket: int, head_dim: int, table: dict | None = None) -> triton.Config:
    """The config for a prefill launch on `target` (sm_80 / sm_89 / sm_90): table[target][head_dim][q_bucket]
    when the tuned table has it, else `default_prefill_config`."""
    table = tuned_table("paged_prefill") if table is None else table
    name = table.get(target, {}).get(str(head_dim), {}).get(str(q_bucket)) or \
        default_prefill_config(target, q_bucket, head_dim)
    if target not in PREFILL_TARGETS.get(name, ()):
        raise ValueError(f"tuned prefill table: {name!r} ({target}, q bucket {q_bucket}) is not a prefill config "
                         f"for {target}; configs: {[n for n, t in PREFILL_TARGETS.items() if target in t]}")
    return PREFILL_BY_NAME[name]


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
    cfg = paged_prefill_kernel.config_for(lambda: choose_prefill_config(
        device_target(q.device.index), prefill_q_bucket(max_query_len), head_dim))
    grid = (num_heads, triton.cdiv(max_query_len, cfg.kwargs["BLOCK_M"]), num_seqs)
    paged_prefill_kernel.fn[grid](q, k_pool, v_pool, out, block_tables, seq_lens, query_start_loc, q.stride(0),
                                  q.stride(1), out.stride(0), out.stride(1), GROUP=num_heads // num_kv_heads,
                                  **_common_args(k_pool, v_pool, block_tables, head_dim, scale), **cfg.kwargs,
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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


# GLM-4-9B's attention launches, for the compile matrix: 28 query / 2 KV heads of 128, pools [blocks, 32, 2, 128],
# q and out contiguous [tokens, 28, 128].
SPEC_HEADS, SPEC_KV_HEADS, SPEC_HEAD_DIM, SPEC_BLOCK_SIZE = 28, 2, 128, 32


def spec_common_args(dtype: str) -> dict:
    """The arguments every paged-attention launch at SPEC_* shapes passes (pointers, pool strides, constants)."""
    from .specs import TensorArg
    t, i32 = TensorArg(dtype), TensorArg("i32")
    pool = {"b": SPEC_BLOCK_SIZE * SPEC_KV_HEADS * SPEC_HEAD_DIM, "t": SPEC_KV_HEADS * SPEC_HEAD_DIM,
            "h": SPEC_HEAD_DIM}
    return {"q_ptr": t, "k_ptr": t, "v_ptr": t, "o_ptr": t, "bt_ptr": i32, "seq_lens_ptr": i32,
            **{f"stride_{c}{d}": n for c in "kv" for d, n in pool.items()},
            "qk_scale": _LOG2E / math.sqrt(SPEC_HEAD_DIM), "HEAD_DIM": SPEC_HEAD_DIM, "BLOCK_D": SPEC_HEAD_DIM,
            "BLOCK_SIZE": SPEC_BLOCK_SIZE, "IEEE": False}


def compile_specs():
    """Every prefill config on each target it is offered for, at one 300-token prompt (a block table 10 pages
    wide) of SPEC_* shapes."""
    from .specs import CompileSpec, TensorArg
    row = SPEC_HEADS * SPEC_HEAD_DIM
    specs = []
    for dtype in ("fp16", "bf16"):
        args = {**spec_common_args(dtype), "qsl_ptr": TensorArg("i32"), "stride_qt": row,
                "stride_qh": SPEC_HEAD_DIM, "stride_ot": row, "stride_oh": SPEC_HEAD_DIM, "stride_bt": 10,
                "GROUP": SPEC_HEADS // SPEC_KV_HEADS}
        for name, cfg in PREFILL_BY_NAME.items():
            specs.append(CompileSpec.from_config("paged_prefill_attention", paged_prefill_kernel.fn, args, cfg,
                                                 label=f"{dtype} {name}", targets=PREFILL_TARGETS[name]))
    return specs
