"""qkv_rope_cache_write (bias + partial interleaved rotary + paged K/V write) vs the eager reference and
GLM's RotaryEmbedding / apply_rotary; the pools must change at exactly the mapped slots."""
from types import SimpleNamespace

import pytest
import torch

from autoglm_fast.kernels.rotary_cache import qkv_rope_cache_write, reference_qkv_rope_cache_write
from autoglm_fast.reference.glm import RotaryEmbedding, apply_rotary, rotary_inv_freq
from kernel_harness import ALL_DTYPES, DEVICE, assert_within, nan_like, randn, reference_pair, requires_kernels

pytestmark = requires_kernels


def _rope(head_dim):
    return RotaryEmbedding(SimpleNamespace(rotary_dim=head_dim // 2, rope_theta=10000.0))  # GLM: half the head


def _inv_freq(head_dim):
    return rotary_inv_freq(head_dim // 2, 10000.0, DEVICE)


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


def _check(qkv, bias, positions, slots, inv_freq, pools, nh, nkv, D, q_out=None, op=qkv_rope_cache_write):
    """Run `op` (the kernel); judge q and both pools against the reference run in fp64 and in the dtype."""
    k_pool, v_pool = pools

    def reference(qkv, bias, inv_freq, k_pool, v_pool):
        q = reference_qkv_rope_cache_write(qkv, bias, positions, slots, inv_freq, k_pool, v_pool, nh, nkv, D)
        return q, k_pool, v_pool
    # The reference writes into copies, always: a reference writing into the pools the kernel is judged by
    # would hide a kernel that never writes them.
    exact, eager = reference_pair(reference, qkv, bias, inv_freq, k_pool.clone(), v_pool.clone())
    got = op(qkv, bias, positions, slots, inv_freq, k_pool, v_pool, nh, nkv, D, q_out=q_out)
    assert_within(got, exact[0], eager[0])
    _check_pool(k_pool, exact[1], eager[1], slots)
    _check_pool(v_pool, exact[2], eager[2], slots)
    return got


@pytest.mark.parametrize("dtype", ALL_DTYPES)  # no dots: bf16 runs in the interpreter (upcast to fp32)
@pytest.mark.parametrize("T", [1, 16, 33])
@pytest.mark.parametrize("block_size, has_bias", [(16, True), (32, False)])
def test_matches_reference(dtype, T, block_size, has_bias):
    nh, nkv, D = 6, 2, 12
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, block_size, 5, seed=T)
    bias = bias if has_bias else None
    q_out = nan_like((T, nh, D), dtype)
    got = _check(qkv, bias, positions, slots, _inv_freq(D), (k_pool, v_pool), nh, nkv, D, q_out)
    assert got is q_out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_head_layout(dtype):
    nh, nkv, D, T = 28, 2, 128, 3
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, dtype, 32, 3)
    # q_out with a head stride wider than head_dim: the kernel must use its strides.
    q_out = nan_like((T, nh, D + 4), dtype)[..., :D]
    _check(qkv, bias, positions, slots, _inv_freq(D), (k_pool, v_pool), nh, nkv, D, q_out)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("skip", ["k", "v"])
def test_check_fails_an_op_that_skips_a_pool(dtype, skip):
    """The check itself: an op exact in q and one pool but never writing the other must fail it."""
    nh, nkv, D, T = 6, 2, 12, 5
    qkv, bias, positions, slots, pools = _inputs(T, nh, nkv, D, dtype, 16, 3)

    def op(qkv, bias, positions, slots, inv_freq, k_pool, v_pool, *heads, q_out):
        scratch = {"k": k_pool.clone(), "v": v_pool.clone()}
        k, v = (scratch["k"] if skip == "k" else k_pool), (scratch["v"] if skip == "v" else v_pool)
        q_out.copy_(reference_qkv_rope_cache_write(qkv, bias, positions, slots, inv_freq, k, v, *heads))
        return q_out

    with pytest.raises(AssertionError, match="NaN"):
        _check(qkv, bias, positions, slots, _inv_freq(D), pools, nh, nkv, D, nan_like((T, nh, D), dtype), op)


def test_matches_glm_rotary_fp32():
    nh, nkv, D, T = 6, 2, 12, 17
    qkv, bias, positions, slots, (k_pool, v_pool) = _inputs(T, nh, nkv, D, torch.float32, 16, 2, seed=7)
    rope = _rope(D)
    q = qkv_rope_cache_write(qkv, None, positions, slots, _inv_freq(D), k_pool, v_pool,
                             nh, nkv, D)
    cos, sin = rope(positions[None])
    ref_q = apply_rotary(qkv[:, : nh * D].reshape(1, T, nh, D), cos, sin)[0]
    ref_k = apply_rotary(qkv[:, nh * D: (nh + nkv) * D].reshape(1, T, nkv, D), cos, sin)[0]
    torch.testing.assert_close(q, ref_q, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(k_pool[slots // 16, slots % 16], ref_k, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(v_pool[slots // 16, slots % 16], qkv[:, (nh + nkv) * D:].reshape(T, nkv, D))
    assert torch.equal(q[..., D // 2:], qkv[:, : nh * D].reshape(T, nh, D)[..., D // 2:])  # pass-through half


def test_bad_inputs_name_the_argument():
    nh, nkv, D, T = 6, 2, 12, 4
    qkv, bias, pos, slots, (kp, vp) = _inputs(T, nh, nkv, D, torch.float32, 16, 2)
    f = _inv_freq(D)
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
    with pytest.raises(TypeError, match="inv_freq has dtype torch.float16"):
        call(qkv, bias, pos, slots, f.half(), kp, vp, nh, nkv, D)
    with pytest.raises(ValueError, match="inv_freq has 7 frequencies"):
        call(qkv, bias, pos, slots, torch.ones(7, device=DEVICE), kp, vp, nh, nkv, D)
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
