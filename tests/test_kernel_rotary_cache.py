"""qkv_rope_cache_write (bias + partial interleaved rotary + paged K/V write) vs the eager reference and
GLM's RotaryEmbedding / apply_rotary; the pools must change at exactly the mapped slots. With 1-row positions
and with GLM-4.1V's M-RoPE (3 rows t, h, w; frequency runs per `mrope_section`), also through FastGlmAttention.
The cos / sin table (rope_cos_sin_cache) against RotaryEmbedding; the compiled kernel's vector widths."""
import functools
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from autoglm_fast.kernels.compile_matrix import TARGETS, compile_all, format_table
from autoglm_fast.kernels.rotary_cache import (qkv_rope_cache_write, reference_qkv_rope_cache_write,
                                               rope_cos_sin_cache)
from autoglm_fast.reference.glm import RotaryEmbedding, apply_rotary, rotary_inv_freq
from kernel_harness import (ALL_DTYPES, DEVICE, assert_within, nan_like, randn, reference_pair, requires_kernels,
                            tolerance_failures, upcast)

MAX_POSITIONS = 32768  # the tests' positions reach 32767
MROPE_D, MROPE_SECTION = 24, (1, 3, 2)  # rotary_dim 12: 6 frequencies in runs of 1 (t), 3 (h), 2 (w)

def _rope(head_dim, mrope_section=None):  # GLM: half the head
    return RotaryEmbedding(SimpleNamespace(rotary_dim=head_dim // 2, rope_theta=10000.0, mrope_section=mrope_section))


@functools.cache
def _table(head_dim):
    return rope_cos_sin_cache(rotary_inv_freq(head_dim // 2, 10000.0, DEVICE), MAX_POSITIONS)


def _inputs(T, nh, nkv, D, dtype, block_size, num_blocks, seed=0):
    torch.manual_seed(seed)
    width = (nh + 2 * nkv) * D
    qkv = randn(T, width + 8, dtype=dtype)[:, :width]  # a row stride wider than the row
    bias = randn(width, dtype=dtype)
    # Far-apart positions, incl. 0 and large ones where an fp32 angle error would show.
    positions = torch.randint(0, 32768, (T,), device=DEVICE)
    positions[: min(T, 3)] = torch.tensor([30000, 0, 32767][: min(T, 3)], device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]  # shuffled across blocks
    pools = [nan_like((num_blocks, block_size, nkv, D), dtype) for _ in range(2)]
    return qkv, bias, positions, slots, pools


def _check_pool(got, exact, eager, slots):
    bs = got.shape[1]
    written = torch.zeros(got.shape[:2], dtype=torch.bool, device=DEVICE)
    written[slots // bs, slots % bs] = True
    assert got[~written].isnan().all(), "a slot outside slot_mapping was written"
    assert_within(got[written], exact[written], eager[written])


def _check(qkv, bias, positions, slots, table, pools, nh, nkv, D, q_out=None, op=qkv_rope_cache_write,
           mrope_section=None):
    """Run `op` (the kernel); judge q and both pools against the reference run in fp64 and in the dtype."""
    k_pool, v_pool = pools
    mrope = {} if mrope_section is None else {"mrope_section": mrope_section}

    def reference(qkv, bias, table, k_pool, v_pool):
        q = reference_qkv_rope_cache_write(qkv, bias, positions, slots, table, k_pool, v_pool, nh, nkv, D,
                                           **mrope)
        return q, k_pool, v_pool
    # The reference writes into copies, always: a reference writing into the pools the kernel is judged by
    # would hide a kernel that never writes them.
    exact, eager = reference_pair(reference, qkv, bias, table, k_pool.clone(), v_pool.clone())
    got = op(qkv, bias, positions, slots, table, k_pool, v_pool, nh, nkv, D, q_out=q_out, **mrope)
    assert_within(got, exact[0], eager[0])
    _check_pool(k_pool, exact[1], eager[1], slots)
    _check_pool(v_pool, exact[2], eager[2], slots)
    return got


@pytest.mark.parametrize("dtype", ALL_DTYPES)  # no dots: bf16 runs in the interpreter (upcast to fp32)
@pytest.mark.parametrize("T", [1, 16, 33])
@pytest.mark.parametrize("block_size, has_bias", [(16, True), (32, False)])
@requires_kernels
def test_matches_reference(dtype, T, block_size, has_bias):
    nh, nkv, D = 6, 2, 12
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, block_size, 5, seed=T)
    bias = bias if has_bias else None
    # Without bias, q_out a view with a head stride wider than head_dim: the kernel must use its strides.
    q_out = nan_like((T, nh, D), dtype) if has_bias else nan_like((T, nh, D + 4), dtype)[..., :D]
    got = _check(qkv, bias, positions, slots, _table(D), (k_pool, v_pool), nh, nkv, D, q_out)
    assert got is q_out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@requires_kernels
def test_real_head_layout(dtype):
    nh, nkv, D, T = 28, 2, 128, 3
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, 32, 3)
    # q_out with a head stride wider than head_dim: the kernel must use its strides.
    q_out = nan_like((T, nh, D + 4), dtype)[..., :D]
    _check(qkv, bias, positions, slots, _table(D), (k_pool, v_pool), nh, nkv, D, q_out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("skip", ["k", "v"])
@requires_kernels
def test_check_fails_an_op_that_skips_a_pool(dtype, skip):
    """The check itself: an op exact in q and one pool but never writing the other must fail it."""
    nh, nkv, D, T = 6, 2, 12, 5
    qkv, bias, positions, slots, pools = _inputs(T, nh, nkv, D, dtype, 16, 3)

    def op(qkv, bias, positions, slots, table, k_pool, v_pool, *heads, q_out):
        scratch = {"k": k_pool.clone(), "v": v_pool.clone()}
        k, v = (scratch["k"] if skip == "k" else k_pool), (scratch["v"] if skip == "v" else v_pool)
        q_out.copy_(reference_qkv_rope_cache_write(qkv, bias, positions, slots, table, k, v, *heads))
        return q_out

    with pytest.raises(AssertionError, match="NaN"):
        _check(qkv, bias, positions, slots, _table(D), pools, nh, nkv, D, nan_like((T, nh, D), dtype), op)


@requires_kernels
def test_matches_glm_rotary_fp32():
    nh, nkv, D, T = 6, 2, 12, 17
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2, seed=7)
    rope = _rope(D)
    q = qkv_rope_cache_write(qkv, None, positions, slots, _table(D), k_pool, v_pool,
                             nh, nkv, D)
    cos, sin = rope(positions[None])
    ref_q = apply_rotary(qkv[:, : nh * D].reshape(1, T, nh, D), cos, sin)[0]
    ref_k = apply_rotary(qkv[:, nh * D: (nh + nkv) * D].reshape(1, T, nkv, D), cos, sin)[0]
    torch.testing.assert_close(q, ref_q, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(k_pool[slots // 16, slots % 16], ref_k, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(v_pool[slots // 16, slots % 16], qkv[:, (nh + nkv) * D:].reshape(T, nkv, D))
    assert torch.equal(q[..., D // 2:], qkv[:, : nh * D].reshape(T, nh, D)[..., D // 2:])  # pass-through half


@requires_kernels
def test_bad_inputs_name_the_argument():
    nh, nkv, D, T = 6, 2, 12, 4
    qkv, bias, pos, slots, (kp, vp) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    f = _table(D)
    call = qkv_rope_cache_write
    with pytest.raises(ValueError, match="qkv has width 120"):
        call(qkv, bias, pos, slots, f, kp, vp, nh + 1, nkv, D)
    with pytest.raises(ValueError, match="bias must have shape"):
        call(qkv, bias[:-1], pos, slots, f, kp, vp, nh, nkv, D)
    with pytest.raises(TypeError, match="bias has dtype torch.float16"):
        call(qkv, bias.half(), pos, slots, f, kp, vp, nh, nkv, D)
    with pytest.raises(TypeError, match="positions has dtype torch.int32"):
        call(qkv, bias, pos.int(), slots, f, kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="slot_mapping must have shape \\(4,\\)"):
        call(qkv, bias, pos, slots[:3], f, kp, vp, nh, nkv, D)
    with pytest.raises(TypeError, match="cos_sin_cache has dtype torch.float16"):
        call(qkv, bias, pos, slots, f.half(), kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="cos_sin_cache must be 2-D"):
        call(qkv, bias, pos, slots, rotary_inv_freq(6, 1e4, DEVICE), kp, vp, nh, nkv, D)
    for bad in (torch.ones(8, 14, device=DEVICE), torch.ones(8, 7, device=DEVICE), torch.ones(0, 6, device=DEVICE)):
        with pytest.raises(ValueError, match=re.escape(f"rotary_dim even and at most head_dim 12, got shape "
                                                       f"{tuple(bad.shape)}")):
            call(qkv, bias, pos, slots, bad, kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="cos_sin_cache must be contiguous"):
        call(qkv, bias, pos, slots, torch.ones(12, 8, device=DEVICE)[::2, :6], kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="cos_sin_cache is on meta"):
        call(qkv, bias, pos, slots, f.to("meta"), kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="k_pool must be \\[num_blocks, block_size, 2, 12\\]"):
        call(qkv, bias, pos, slots, f, kp[:, :, :1], vp, nh, nkv, D)
    with pytest.raises(TypeError, match="v_pool has dtype torch.float16"):
        call(qkv, bias, pos, slots, f, kp, vp.half(), nh, nkv, D)
    with pytest.raises(ValueError, match="v_pool has shape"):
        call(qkv, bias, pos, slots, f, kp, vp[:1], nh, nkv, D)
    with pytest.raises(ValueError, match="q_out must have shape"):
        call(qkv, bias, pos, slots, f, kp, vp, nh, nkv, D, q_out=nan_like((T, nh, D + 1), torch.float32))
    with pytest.raises(ValueError, match="head_dim must be even"):
        call(randn(T, 10 * 11), None, pos, slots, f, kp, vp, nh, nkv, 11)
    with pytest.raises(ValueError, match="qkv must have a unit stride"):
        call(randn(120, T).T, bias, pos, slots, f, kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="positions is on meta"):
        call(qkv, bias, pos.to("meta"), slots, f, kp, vp, nh, nkv, D)



def test_table_is_glm_rotary():
    """rope_cos_sin_cache's row p: RotaryEmbedding's cos | sin at position p (one per pair), same fp32 angles."""
    D, positions = 24, torch.tensor([[0, 1, 17, 4095, 30000, 32767]], device=DEVICE)
    cos, sin = _rope(D)(positions)
    rows = _table(D)[positions[0]]
    assert _table(D).shape == (MAX_POSITIONS, D // 2) and _table(D).dtype == torch.float32
    torch.testing.assert_close(rows, torch.cat([cos[0, :, 0::2], sin[0, :, 0::2]], dim=-1), rtol=1.3e-6, atol=1e-6)


def test_table_bad_inputs_name_the_argument():
    f = rotary_inv_freq(12, 1e4, DEVICE)
    with pytest.raises(TypeError, match="inv_freq must be a 1-D fp32 tensor"):
        rope_cos_sin_cache(f.half(), 8)
    with pytest.raises(TypeError, match="inv_freq must be a 1-D fp32 tensor"):
        rope_cos_sin_cache(f[None], 8)
    for bad in (0, 8.0, True):
        with pytest.raises(ValueError, match="max_positions must be a positive int"):
            rope_cos_sin_cache(f, bad)


@requires_kernels
@pytest.mark.parametrize("mrope_section", [None, MROPE_SECTION], ids=["rope", "mrope"])
def test_wrong_table_fails_the_check(mrope_section):
    """Teeth: the kernel fed a table whose rows are one position off must fail the check against the right one."""
    nh, nkv, D, T = 6, 2, MROPE_D, 17
    qkv, bias, positions, slots, pools = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    if mrope_section is not None:
        positions = _mrope_positions(T)
    shifted = torch.cat([_table(D)[1:], _table(D)[-1:]])  # row p holds position p + 1

    def op(qkv, bias, positions, slots, table, *rest, **kw):
        return qkv_rope_cache_write(qkv, bias, positions, slots, shifted, *rest, **kw)

    with pytest.raises(AssertionError, match="error"):
        _check(qkv, bias, positions, slots, _table(D), pools, nh, nkv, D, op=op, mrope_section=mrope_section)


@requires_kernels
@pytest.mark.parametrize("mrope_section", [None, MROPE_SECTION], ids=["rope", "mrope"])
def test_positions_past_the_table_are_clamped(mrope_section):
    """Positions at or past the table's end are the caller's error; the kernel stays in bounds (last row)."""
    nh, nkv, D, T = 6, 2, MROPE_D, 17
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    if mrope_section is not None:
        positions = _mrope_positions(T)
    short = _table(D)[:30006]  # positions reach 32767 (1-row) and 30013 (M-RoPE)
    assert (positions > 30005).any() and (positions < 30005).any()
    got = qkv_rope_cache_write(qkv, bias, positions, slots, short, k_pool, v_pool, nh, nkv, D,
                               mrope_section=mrope_section)
    k_got, v_got = k_pool.clone(), v_pool.clone()
    want = qkv_rope_cache_write(qkv, bias, positions.clamp(max=30005), slots, short, k_pool, v_pool, nh, nkv, D,
                                mrope_section=mrope_section)
    assert not got.isnan().any() and torch.equal(got, want)
    assert torch.equal(k_got.nan_to_num(), k_pool.nan_to_num()) and torch.equal(v_got.nan_to_num(), v_pool.nan_to_num())


# ---- M-RoPE (GLM-4.1V) ---------------------------------------------------------------------------------


def _mrope_positions(T, start=30000):
    """[3, T] (t, h, w) as GLM-4.1V's get_rope_index lays them out: text (all rows equal), an image grid of 6 x 11
    (t constant, h its row, w its column: non-monotonic along the tokens), text again from the grid's largest
    position + 1. A window of T tokens; one token (T = 1) lands inside the grid, where the rows differ. Held in a
    wider tensor, so the row stride is not T."""
    text = [[start + i] * 3 for i in range(3)]
    t0 = start + 3
    grid = [[t0, t0 + r, t0 + c] for r in range(6) for c in range(11)]
    after = t0 + 11
    text += grid + [[after + i] * 3 for i in range(30)]
    first = 16 if T == 1 else 1  # T = 1: grid row 1, column 2
    rows = torch.tensor(text[first:first + T], device=DEVICE).T
    wide = torch.full((3, T + 5), -1, dtype=torch.int64, device=DEVICE)
    wide[:, :T] = rows
    return wide[:, :T]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("T", [1, 17, 64 + 17])
@pytest.mark.parametrize("block_size, has_bias", [(16, True), (32, False)])
@requires_kernels
def test_mrope_matches_reference(dtype, T, block_size, has_bias):
    nh, nkv, D = 6, 2, MROPE_D
    qkv, bias, _, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, block_size, 7, seed=T)
    positions = _mrope_positions(T)
    assert positions.stride(0) == T + 5 and (positions[0] != positions[2]).any()  # a row stride; rows differ
    q_out = nan_like((T, nh, D), dtype)
    got = _check(qkv, bias if has_bias else None, positions, slots, _table(D), (k_pool, v_pool), nh, nkv, D,
                 q_out, mrope_section=MROPE_SECTION)
    assert got is q_out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@requires_kernels
def test_mrope_real_head_layout(dtype):
    """GLM-4.1V: 32 q / 2 KV heads of 128, rotary_dim 64, mrope_section (8, 12, 12)."""
    nh, nkv, D, T = 32, 2, 128, 17
    qkv, bias, _, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, 32, 3)
    _check(qkv, bias, _mrope_positions(T), slots, _table(D), (k_pool, v_pool), nh, nkv, D,
           mrope_section=(8, 12, 12))


@requires_kernels
def test_mrope_two_rows():
    nh, nkv, D, T = 6, 2, MROPE_D, 17
    qkv, bias, _, slots, pools = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    _check(qkv, bias, _mrope_positions(T)[1:], slots, _table(D), pools, nh, nkv, D, mrope_section=(4, 2))


@pytest.mark.parametrize("T", [1, 17])
@requires_kernels
def test_mrope_matches_glm_rotary_fp32(T):
    """The kernel against autoglm_fast/reference/glm.py's RotaryEmbedding (M-RoPE) + apply_rotary."""
    nh, nkv, D = 6, 2, MROPE_D
    qkv, _, _, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2, seed=7)
    positions = _mrope_positions(T)
    q = qkv_rope_cache_write(qkv, None, positions, slots, _table(D), k_pool, v_pool, nh, nkv, D,
                             mrope_section=MROPE_SECTION)
    cos, sin = _rope(D, MROPE_SECTION)(positions[:, None])  # [3, B=1, T]
    ref_q = apply_rotary(qkv[:, : nh * D].reshape(1, T, nh, D), cos, sin)[0]
    ref_k = apply_rotary(qkv[:, nh * D: (nh + nkv) * D].reshape(1, T, nkv, D), cos, sin)[0]
    torch.testing.assert_close(q, ref_q, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(k_pool[slots // 16, slots % 16], ref_k, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(v_pool[slots // 16, slots % 16], qkv[:, (nh + nkv) * D:].reshape(T, nkv, D))
    assert torch.equal(q[..., D // 2:], qkv[:, : nh * D].reshape(T, nh, D)[..., D // 2:])  # pass-through half


@requires_kernels
def test_mrope_with_equal_rows_is_the_one_row_path():
    """Text: three equal rows under any section give exactly the 1-row result."""
    nh, nkv, D, T = 6, 2, MROPE_D, 17
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    one = qkv_rope_cache_write(qkv, bias, positions, slots, _table(D), k_pool, v_pool, nh, nkv, D)
    k_one, v_one = k_pool.clone(), v_pool.clone()
    three = qkv_rope_cache_write(qkv, bias, positions.expand(3, T), slots, _table(D), k_pool, v_pool,
                                 nh, nkv, D, mrope_section=MROPE_SECTION)
    assert torch.equal(one, three)
    assert torch.equal(k_pool.nan_to_num(), k_one.nan_to_num()) and torch.equal(v_pool.nan_to_num(), v_one.nan_to_num())


@pytest.mark.parametrize("wrong", ["rows h, w swapped", "section reversed", "row 0 only"])
@requires_kernels
def test_mrope_wrong_section_fails_the_check(wrong):
    """Teeth: the kernel run with the rows or the section wrong must fail the check against the right reference."""
    nh, nkv, D, T = 6, 2, MROPE_D, 17
    qkv, bias, _, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    positions = _mrope_positions(T)

    def op(qkv, bias, positions, slots, table, k_pool, v_pool, *heads, q_out, mrope_section):
        if wrong == "rows h, w swapped":
            positions = positions[[0, 2, 1]]
        elif wrong == "section reversed":
            mrope_section = mrope_section[::-1]
        else:
            return qkv_rope_cache_write(qkv, bias, positions[0], slots, table, k_pool, v_pool, *heads,
                                        q_out=q_out)
        return qkv_rope_cache_write(qkv, bias, positions, slots, table, k_pool, v_pool, *heads, q_out=q_out,
                                    mrope_section=mrope_section)

    with pytest.raises(AssertionError, match="error"):
        _check(qkv, bias, positions, slots, _table(D), (k_pool, v_pool), nh, nkv, D, op=op,
               mrope_section=MROPE_SECTION)


@requires_kernels
def test_mrope_bad_inputs_name_the_argument():
    nh, nkv, D, T = 6, 2, MROPE_D, 4
    qkv, bias, pos1, slots, (kp, vp) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    pos, f, sec = _mrope_positions(T), _table(D), MROPE_SECTION

    def call(positions, mrope_section):
        qkv_rope_cache_write(qkv, bias, positions, slots, f, kp, vp, nh, nkv, D, mrope_section=mrope_section)
    with pytest.raises(ValueError, match="positions has 3 rows \\(M-RoPE\\) but mrope_section is None"):
        call(pos, None)
    with pytest.raises(ValueError, match="mrope_section \\(1, 3, 2\\) needs M-RoPE positions"):
        call(pos1, sec)
    with pytest.raises(ValueError, match="mrope_section \\(2, 3, 2\\) sums to 7, not rotary_dim / 2 = 6"):
        call(pos, (2, 3, 2))
    with pytest.raises(ValueError, match="mrope_section \\(3, 3\\) has 2 parts but positions has 3 rows"):
        call(pos, (3, 3))
    with pytest.raises(TypeError, match="mrope_section must be a tuple of positive ints"):
        call(pos, (0, 4, 2))
    with pytest.raises(TypeError, match="mrope_section must be a tuple of positive ints"):
        call(pos, (1.0, 3, 2))
    with pytest.raises(TypeError, match="mrope_section must be a tuple of positive ints"):
        call(pos, 6)
    with pytest.raises(ValueError, match="positions must be \\[num_tokens\\] or M-RoPE's"):
        call(torch.cat([pos, pos[:1]]), (1, 1, 2, 2))
    with pytest.raises(ValueError, match="positions must be \\[num_tokens\\] or M-RoPE's"):
        call(pos[:1], (6,))
    with pytest.raises(ValueError, match="positions must be \\[num_tokens\\] or M-RoPE's"):
        call(pos[:, None], sec)
    with pytest.raises(ValueError, match="positions must have shape \\(3, 4\\), got \\(3, 3\\)"):
        call(pos[:, :3], sec)
    with pytest.raises(TypeError, match="positions has dtype torch.float32"):
        call(pos.float(), sec)
    with pytest.raises(TypeError, match="positions has dtype torch.int32"):
        call(pos.int(), sec)
    with pytest.raises(ValueError, match="positions must have a unit stride"):
        call(torch.zeros(T, 3, dtype=torch.int64, device=DEVICE).T, sec)


# ---- through FastGlmAttention: meta.rope_positions --------------------------------------------------------
def _attention_pair(dtype):
    from autoglm_fast.config import TextConfig
    from autoglm_fast.fast import FastGlmAttention
    from autoglm_fast.reference.glm import GlmAttention
    config = TextConfig(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=MROPE_D, rope_theta=10000.0,
                        max_position_embeddings=64, mrope_section=MROPE_SECTION, sandwich_norms=True)
    torch.manual_seed(0)
    ref = GlmAttention(config).to(DEVICE, dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(3.0)  # attention that is not near uniform
    ref.requires_grad_(False)
    return config, ref, FastGlmAttention.from_reference(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@torch.no_grad()
@requires_kernels
def test_fast_attention_uses_meta_rope_positions(dtype):
    """FastGlmAttention on the paged cache with meta.rope_positions (prefill of an image-like prompt, then one
    decode step) against GlmAttention fed RotaryEmbedding's M-RoPE cos/sin over a contiguous KVCache."""
    from autoglm_fast.paged_cache import PagedKVCache
    from autoglm_fast.reference.glm import KVCache
    config, ref, fast = _attention_pair(dtype)
    assert fast.mrope_section == MROPE_SECTION
    rope = RotaryEmbedding(config)
    T = 17
    rope_pos = _mrope_positions(T + 1, start=0).contiguous()  # token T: the decode step
    x = randn(1, T + 1, config.hidden_size, dtype=dtype)
    ref_cache = KVCache(1, T + 1, config.num_key_value_heads, config.head_dim, dtype, DEVICE)
    ref_caches = [upcast(ref_cache), ref_cache]
    paged = PagedKVCache(config, num_blocks=4, block_size=16, dtype=dtype, device=DEVICE)
    for lo, hi in ((0, T), (T, T + 1)):
        meta = paged.step(["r"], [hi - lo])
        meta.rope_positions = rope_pos[:, lo:hi]
        positions = meta.positions[None]
        cos, sin = rope(rope_pos[:, None, lo:hi])
        # The reference in fp64 and in the dtype, each over its own cache; the fast module ignores cos/sin.
        exact, eager = (r(xx, c, s, positions, cache) for r, xx, c, s, cache in zip(
            (upcast(ref), ref), (upcast(x[:, lo:hi]), x[:, lo:hi]), (cos.double(), cos), (sin.double(), sin),
            ref_caches))
        # Teeth: the same step with the rows ignored (1-row positions) is a different answer. (First: the run
        # after it writes this step's K again, with the M-RoPE angles.)
        plain = fast(x[:, lo:hi], cos, sin, positions, paged.layer_caches(replace(meta, rope_positions=None))[0])
        assert tolerance_failures(plain, exact, eager), "rope_positions made no difference"
        got = fast(x[:, lo:hi], cos, sin, positions, paged.layer_caches(meta)[0])
        assert_within(got, exact, eager)


# ---- the compiled kernel (no GPU needed) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    return compile_all(kernels=["qkv_rope_cache"], workers=1)


def test_compiled_accesses_are_vectors_without_spills(compiled, capsys):
    """At the real shapes every head row moves in >= 64-bit vectors (the stride-2 pair accesses were 16-bit
    scalars), and no target spills."""
    with capsys.disabled():
        print("\n" + format_table(compiled))
    assert {r.target for r in compiled} == set(TARGETS) and len(compiled) == 6 * len(TARGETS)
    for r in compiled:
        assert r.ok and r.spill_bytes == 0, (r.config, r.target, r.errors)
        if r.target == "sm_90":
            for kind, counts in (("loads", r.global_loads), ("stores", r.global_stores)):
                wide = sum(n for bits, n in counts.items() if int(bits) >= 64)
                assert wide >= 0.9 * sum(counts.values()), (r.config, kind, counts)
