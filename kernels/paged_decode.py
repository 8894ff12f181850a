"""Decode attention over the paged KV cache: one new token per sequence, flash-decoding.

One program per (sequence, KV head, split) holds the whole GQA group as one tile (padded to >= 16 rows
for tl.dot), so each K/V page is read once per group; with splits, each writes an (o, lse) partial that
a small kernel merges. The online-softmax loop and the input checks are the prefill kernel's
(paged_attention.py). Eager reference: `reference_paged_attention` there, at q_len = 1.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .paged_attention import (SPEC_HEAD_DIM, SPEC_HEADS, SPEC_KV_HEADS, _attend, _check_inputs, _common_args,
                              _output, spec_common_args)

DECODE_CONFIG = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)  # fixed: split lengths round to BLOCK_N
MIN_SPLIT_TOKENS, MAX_SPLITS = 256, 64


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


def compile_specs():
    """Decode at SPEC_* shapes (CUDA graphs: tables cdiv(4096, 32) = 256 pages wide): a 300-token context in one
    split, and a 4096-token one in 16 splits of 256 (decode_num_splits on 132 SMs), then their merge."""
    from .specs import CompileSpec, TensorArg
    group = SPEC_HEADS // SPEC_KV_HEADS
    rows = {"stride_os": SPEC_HEADS * SPEC_HEAD_DIM, "stride_oh": SPEC_HEAD_DIM, "NUM_HEADS": SPEC_HEADS,
            "GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group))}
    specs = []
    for dtype in ("fp16", "bf16"):
        t, i32, f32 = TensorArg(dtype), TensorArg("i32"), TensorArg("fp32")
        for splits, split_len in ((1, 320), (16, 256)):
            part_o, part_lse = (f32, f32) if splits > 1 else (t, t)  # unused without splits: the launcher passes out
            args = {**spec_common_args(dtype), **rows, "part_o_ptr": part_o, "part_lse_ptr": part_lse,
                    "split_len": split_len, "num_splits": splits, "stride_qs": SPEC_HEADS * SPEC_HEAD_DIM,
                    "stride_qh": SPEC_HEAD_DIM, "stride_bt": 256, "SPLIT": splits > 1}
            specs.append(CompileSpec.from_config(
                "paged_decode_attention", paged_decode_kernel, args, DECODE_CONFIG,
                label=f"{dtype} {f'{splits} splits' if splits > 1 else 'single'} {DECODE_CONFIG.kwargs['BLOCK_N']} "
                      f"w{DECODE_CONFIG.num_warps} s{DECODE_CONFIG.num_stages}"))
        args = {**rows, "part_o_ptr": f32, "part_lse_ptr": f32, "o_ptr": t, "seq_lens_ptr": i32, "split_len": 256,
                "num_splits": 16, "HEAD_DIM": SPEC_HEAD_DIM, "BLOCK_D": SPEC_HEAD_DIM}
        specs.append(CompileSpec("paged_decode_reduce", paged_decode_reduce_kernel, args, num_warps=4,
                                 label=f"{dtype} 16 splits w4"))
    return specs
