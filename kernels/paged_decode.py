"""Decode attention over the paged KV cache: one new token per sequence, flash-decoding in ONE launch.

- Tile: one program per (split, KV head, sequence) holds the whole GQA group as one tl.dot tile
  (GROUP_PAD >= 16 rows), so each K/V page is read once per group. The online-softmax loop and the
  input checks are the prefill kernel's (paged_attention.py).
- Plan: the launcher fixes only the grid's split count, from the host-side bound max_seq_len (in the
  decode CUDA graph that is max_model_len): `decode_grid_splits`, about two waves of programs over the
  SMs, at most MAX_SPLITS. Each program derives its own sequence's plan from seq_lens (a device buffer,
  static in graphs): split_len = round_up(max(cdiv(seq_len, grid_splits), MIN_CHUNK), BLOCK_N),
  used = cdiv(seq_len, split_len); programs past `used` exit at once. A 2k context uses 16 splits of
  128 keys, a 32k one all 64 of 512, in the same graph, with no host work per step.
- Merge, fused: a sequence that uses one split writes o directly. Otherwise each split writes its
  normalized partial o and log2-sum-exp (fp32) and bumps the (sequence, KV head)'s counter; the
  program that brings it to `used` is the last one and merges: all split LSEs of each head as one
  [SPLITS_PAD] vector give the weights 2^(lse_s - m) / sum, then the partial o's are summed in chunks
  of MERGE_CHUNK splits. Ordering: a CTA barrier, then the counter's atomic with acq_rel at gpu scope
  (all the CTA's partial stores happen before it), and the last program reads the partials with .cg
  (L2, never a stale L1 line). It then resets the counter to 0, so the next launch or graph replay
  starts clean. Counters: a persistent zero-initialized int32 buffer per device (`split_counters`),
  grown only when more (sequence, KV head) pairs are needed, old buffers kept alive for graphs
  captured with them. Launches sharing a buffer must be stream-ordered (the engine's one stream).
- Why MAX_SPLITS 64, MIN_CHUNK 128: the last program reads splits x group x head_dim x 4 bytes alone
  (458 KB at 64 splits of group 14); more splits or shorter ones make that serial tail grow past what
  the extra parallelism saves. The Triton interpreter runs programs one after another, so the last
  program's merge runs there too.
Eager reference: `reference_paged_attention` in paged_attention.py, at q_len = 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_attention import (SPEC_HEAD_DIM, SPEC_HEADS, SPEC_KV_HEADS, _attend, _check_inputs, _common_args,
                              _output, spec_common_args)
from .utils import sm_count, split_counters

MIN_CHUNK, MAX_SPLITS, MERGE_CHUNK = 128, 64, 4
# A fixed table (no autotune: the launch runs inside CUDA-graph capture), picked by the longest split the
# host-side bound allows. Short splits: small tiles, so a 128-key split is still a 2-step pipeline. Three
# stages = page indices two tiles ahead, K/V one tile ahead (the K/V loads depend on the index load); a 4th
# stage compiles to the same code. Long splits: 64 KB of K/V in flight per program.
DECODE_CONFIGS = {
    "short": triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),   # splits < LONG_SPLIT keys
    "long": triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),   # more bytes in flight per SM
}
LONG_SPLIT = 512


@triton.jit
def paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, counter_ptr, bt_ptr, seq_lens_ptr,
                        num_splits, min_chunk, stride_qs, stride_qh, stride_os, stride_oh, stride_kb, stride_kt,
                        stride_kh, stride_vb, stride_vt, stride_vh, stride_bt, qk_scale, NUM_HEADS: tl.constexpr,
                        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr, SPLITS_PAD: tl.constexpr,
                        MERGE_CHUNK: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    split, kv_head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # This sequence's own plan (the grid only bounds it): whole tiles, >= min_chunk keys, <= num_splits splits.
    split_len = tl.cdiv(tl.maximum(tl.cdiv(seq_len, num_splits), min_chunk), BLOCK_N) * BLOCK_N
    used = tl.cdiv(seq_len, split_len)
    if split >= used:
        return
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    rows_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask = rows_ok[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :], mask=mask,
                other=0.0)
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
    o_ptrs = o_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    if used == 1:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)
    else:
        if SPLIT:  # partials [num_seqs, num_splits, num_heads, (head_dim)] in fp32
            base = seq.to(tl.int64) * num_splits
            part = (base + split) * NUM_HEADS + heads
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask)
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=rows_ok)
            tl.debug_barrier()  # every thread's partial stores precede the release below
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == used - 1:  # the last split to finish
                tl.store(counter, 0)  # clean for the next launch (stream-ordered after this one)
                _merge(part_o_ptr, part_lse_ptr, o_ptrs, base, used, heads, rows_ok, offs_d, mask_d, NUM_HEADS,
                       GROUP_PAD, HEAD_DIM, BLOCK_D, SPLITS_PAD, MERGE_CHUNK)


@triton.jit
def _merge(part_o_ptr, part_lse_ptr, o_ptrs, base, used, heads, rows_ok, offs_d, mask_d, NUM_HEADS: tl.constexpr,
           GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_PAD: tl.constexpr,
           MERGE_CHUNK: tl.constexpr):
    """o = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m) over the group's `used` splits, per head."""
    offs_s = tl.arange(0, SPLITS_PAD)
    ok = (offs_s < used)[:, None] & rows_ok[None, :]
    # Missing splits and padded rows at -1e30 (finite): weight 0, and never inf - inf.
    lse = tl.load(part_lse_ptr + (base + offs_s)[:, None] * NUM_HEADS + heads[None, :], mask=ok, other=-1.0e30,
                  cache_modifier=".cg")
    m = tl.max(lse, axis=0)
    inv_sum = 1.0 / tl.sum(tl.exp2(lse - m[None, :]), axis=0)
    acc = tl.zeros((GROUP_PAD, BLOCK_D), dtype=tl.float32)
    for s0 in range(0, used, MERGE_CHUNK):  # MERGE_CHUNK splits' [group, head_dim] partials per load
        offs_c = s0 + tl.arange(0, MERGE_CHUNK)
        part = (base + offs_c)[:, None] * NUM_HEADS + heads[None, :]
        ok_c = (offs_c < used)[:, None] & rows_ok[None, :]
        w = tl.exp2(tl.load(part_lse_ptr + part, mask=ok_c, other=-1.0e30, cache_modifier=".cg") - m[None, :])
        o = tl.load(part_o_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok_c[:, :, None] & mask_d[None, None, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * o, axis=0)
    out = acc * inv_sum[:, None]
    tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=rows_ok[:, None] & mask_d[None, :])


def decode_grid_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device) -> int:
    """The grid's split dimension for a launch whose sequences are at most max_seq_len long: enough
    programs for ~2 waves over the SMs (2 * SMs / (num_seqs * num_kv_heads)), at most MAX_SPLITS, and no
    more than MIN_CHUNK-key chunks of max_seq_len. Each sequence then uses as many as its own length needs."""
    want = triton.cdiv(2 * sm_count(torch.device(device)), max(1, num_seqs * num_kv_heads))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(max_seq_len, MIN_CHUNK)))


def decode_config(max_seq_len: int, grid_splits: int, min_chunk: int = MIN_CHUNK) -> str:
    """DECODE_CONFIGS key for a launch: "long" when its longest split reaches LONG_SPLIT keys."""
    return "long" if max(triton.cdiv(max_seq_len, grid_splits), min_chunk) >= LONG_SPLIT else "short"


def paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, max_seq_len: int, scale: float | None = None,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           min_chunk: int = MIN_CHUNK) -> torch.Tensor:
    """q [num_seqs, num_heads, head_dim] (each sequence's one new token, already in the cache) ->
    attention over its seq_lens[s] cached keys, [num_seqs, num_heads, head_dim]. max_seq_len bounds
    seq_lens (a static bound, e.g. max_model_len, replays any shorter context). num_splits None:
    `decode_grid_splits`; else the grid's split count. Each sequence splits into chunks of at least
    min_chunk keys (rounded to whole key tiles)."""
    num_seqs = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() == 3 else -1
    num_heads, num_kv_heads, head_dim, _ = _check_inputs(q, k_pool, v_pool, block_tables, seq_lens, num_seqs,
                                                         max_seq_len)
    if num_splits is None:
        num_splits = decode_grid_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if not isinstance(min_chunk, int) or min_chunk < 1:
        raise ValueError(f"min_chunk must be a positive int, got {min_chunk!r}")
    out = _output(out, q, tuple(q.shape))
    if num_seqs == 0:
        return out
    cfg = DECODE_CONFIGS[decode_config(max_seq_len, num_splits, min_chunk)]
    group = num_heads // num_kv_heads
    part_o = part_lse = counters = out  # unused by a single split
    if num_splits > 1:
        part_o = torch.empty(num_seqs, num_splits, num_heads, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_splits, num_heads, device=q.device, dtype=torch.float32)
        counters = split_counters(q.device, num_seqs * num_kv_heads)
    paged_decode_kernel[(num_splits, num_kv_heads, num_seqs)](
        q, k_pool, v_pool, out, part_o, part_lse, counters, block_tables, seq_lens, num_splits, min_chunk,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), NUM_HEADS=num_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), SPLIT=num_splits > 1,
        SPLITS_PAD=triton.next_power_of_2(num_splits), MERGE_CHUNK=MERGE_CHUNK,
        **_common_args(k_pool, v_pool, block_tables, head_dim, scale), **cfg.kwargs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def compile_specs():
    """Decode at SPEC_* shapes with a 32k bound (CUDA graphs: tables cdiv(32768, 32) = 1024 pages wide), each
    DECODE_CONFIGS entry single-split (a batch past two waves) and at MAX_SPLITS with the fused merge."""
    from .specs import CompileSpec, TensorArg
    group = SPEC_HEADS // SPEC_KV_HEADS
    rows = {"stride_os": SPEC_HEADS * SPEC_HEAD_DIM, "stride_oh": SPEC_HEAD_DIM, "NUM_HEADS": SPEC_HEADS,
            "GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group)), "MERGE_CHUNK": MERGE_CHUNK}
    specs = []
    for dtype in ("fp16", "bf16"):
        t, i32, f32 = TensorArg(dtype), TensorArg("i32"), TensorArg("fp32")
        for name, cfg in DECODE_CONFIGS.items():
            for splits in (1, MAX_SPLITS):
                scratch = (f32, f32, i32) if splits > 1 else (t, t, t)  # a single split: the launcher passes out
                args = {**spec_common_args(dtype), **rows, "part_o_ptr": scratch[0], "part_lse_ptr": scratch[1],
                        "counter_ptr": scratch[2], "num_splits": splits, "min_chunk": MIN_CHUNK,
                        "stride_qs": SPEC_HEADS * SPEC_HEAD_DIM, "stride_qh": SPEC_HEAD_DIM, "stride_bt": 1024,
                        "SPLIT": splits > 1, "SPLITS_PAD": triton.next_power_of_2(splits)}
                label = f"{splits} splits+merge" if splits > 1 else "single"
                specs.append(CompileSpec.from_config(
                    "paged_decode_attention", paged_decode_kernel, args, cfg,
                    label=f"{dtype} {name} {label} {cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"))
    return specs
