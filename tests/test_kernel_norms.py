"""rms_norm (plain, + fused residual add, in place) and swiglu vs their eager references and GLM's modules."""
import pytest
import torch
import torch.nn.functional as F

from autoglm_fast.kernels.norms import reference_rms_norm, reference_swiglu, rms_norm, swiglu
from autoglm_fast.reference.glm import RMSNorm
from kernel_harness import (ALL_DTYPES, DEVICE, assert_matches, assert_within, nan_like, randn, reference_pair,
                            requires_kernels, tolerance_failures)

pytestmark = requires_kernels
EPS = 1.5625e-7  # GLM's rms_norm_eps


def _norm_inputs(rows, H, dtype, seed=0):
    torch.manual_seed(seed)
    x = randn(rows, H + 5, dtype=dtype)[:, :H]  # a row stride wider than the row
    return x, randn(rows, H, dtype=dtype), (1 + 0.1 * torch.randn(H, device=DEVICE)).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)  # no dots: bf16 runs in the interpreter (upcast to fp32)
@pytest.mark.parametrize("rows", [1, 16, 33])
@pytest.mark.parametrize("H", [72, 1041])
@pytest.mark.parametrize("mode", ["plain", "residual", "in_place"])
def test_rms_norm_matches_reference(dtype, rows, H, mode):
    x, residual, w = _norm_inputs(rows, H, dtype, seed=rows + H)
    out = nan_like((rows, H), dtype)
    if mode == "plain":
        got = rms_norm(x, w, EPS, out=out)
        assert got is out
        assert_matches(got, reference_rms_norm, x, w, EPS)
        return
    (exact_y, exact_s), (eager_y, eager_s) = reference_pair(reference_rms_norm, x, w, EPS, residual=residual)
    res_out = residual if mode == "in_place" else nan_like((rows, H), dtype)
    y, s = rms_norm(x, w, EPS, residual=residual, out=out, residual_out=res_out)
    assert y is out and s is res_out
    assert_within(s, exact_s, eager_s)
    assert_within(y, exact_y, eager_y)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 33])
@pytest.mark.parametrize("H", [72, 1041])
def test_pre_norm_residual_matches_reference(dtype, rows, H):
    """GLM-4.1V's sandwich norm, residual add and the next norm in one pass: s = r + rmsnorm_pre(x), y = rmsnorm(s)."""
    x, residual, w = _norm_inputs(rows, H, dtype, seed=3 * rows + H)
    pre_w = (1 + 0.2 * torch.randn(H, device=DEVICE)).to(dtype)
    (exact_y, exact_s), (eager_y, eager_s) = reference_pair(reference_rms_norm, x, w, EPS, residual=residual,
                                                            pre_weight=pre_w, pre_eps=1e-5)
    out = nan_like((rows, H), dtype)
    y, s = rms_norm(x, w, EPS, residual=residual.clone(), out=out, residual_out=None, pre_weight=pre_w, pre_eps=1e-5)
    assert y is out
    assert_within(s, exact_s, eager_s)
    assert_within(y, exact_y, eager_y)
    # the pre-norm matters: skipping it (or its weight) is far outside the tolerance
    (_, plain_s) = reference_rms_norm(x, w, EPS, residual=residual)
    assert tolerance_failures(plain_s, exact_s, eager_s)
    (_, unweighted_s) = reference_rms_norm(x, w, EPS, residual=residual, pre_weight=torch.ones_like(pre_w),
                                           pre_eps=1e-5)
    assert tolerance_failures(unweighted_s, exact_s, eager_s)


def test_pre_norm_matches_glm_modules_fp32():
    """The GLM-4.1V layer's `x + post_norm(h)` then `norm(...)`, by the reference modules."""
    x, residual, w = _norm_inputs(5, 72, torch.float32, seed=7)
    pre, post = RMSNorm(72, 1e-5).to(DEVICE), RMSNorm(72, EPS).to(DEVICE)
    with torch.no_grad():
        pre.weight.copy_(1 + 0.3 * torch.randn(72, device=DEVICE))
        post.weight.copy_(w)
        s_ref = residual + pre(x)
        y, s = rms_norm(x, w, EPS, residual=residual, pre_weight=pre.weight, pre_eps=1e-5)
        torch.testing.assert_close(s, s_ref, rtol=1.3e-6, atol=1e-6)
        torch.testing.assert_close(y, post(s_ref), rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_real_hidden(dtype):
    x, residual, w = _norm_inputs(3, 3584, dtype, seed=1)
    (exact_y, exact_s), (eager_y, eager_s) = reference_pair(reference_rms_norm, x, w, EPS, residual=residual)
    y, s = rms_norm(x.reshape(1, 3, 3584), w, EPS, residual=residual.reshape(1, 3, 3584))  # 3-D, new outputs
    assert y.shape == s.shape == (1, 3, 3584)
    assert_within(s[0], exact_s, eager_s)
    assert_within(y[0], exact_y, eager_y)


def test_rms_norm_matches_glm_module_fp32():
    x, _, w = _norm_inputs(7, 72, torch.float32)
    module = RMSNorm(72, EPS).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(w)
        torch.testing.assert_close(rms_norm(x, w, EPS), module(x), rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("rows", [1, 16, 33])
@pytest.mark.parametrize("I", [72, 1041])  # 1041: two column tiles, the second ragged
def test_swiglu_matches_reference(dtype, rows, I):
    torch.manual_seed(rows + I)
    gate_up = randn(rows, 2 * I + 3, dtype=dtype, scale=3.0)[:, : 2 * I]
    out = nan_like((rows, I), dtype)
    assert swiglu(gate_up, out=out) is out
    assert_matches(out, reference_swiglu, gate_up)


def test_swiglu_matches_glm_mlp_activation_fp32():
    gate_up = randn(2, 5, 2 * 40, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate_up), up * F.silu(gate), rtol=1.3e-6, atol=1e-6)


def test_bad_inputs_name_the_argument():
    x, residual, w = _norm_inputs(4, 8, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\)"):
        rms_norm(x, w[:7], EPS)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        rms_norm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="residual must have shape \\(4, 8\\)"):
        rms_norm(x, w, EPS, residual=residual[:3])
    with pytest.raises(TypeError, match="residual_out has dtype torch.float16"):
        rms_norm(x, w, EPS, residual=residual, residual_out=residual.half())
    with pytest.raises(ValueError, match="residual_out was given without a residual"):
        rms_norm(x, w, EPS, residual_out=residual)
    with pytest.raises(ValueError, match="out must have shape"):
        rms_norm(x, w, EPS, out=nan_like((4, 9), torch.float32))
    with pytest.raises(ValueError, match="eps must be"):
        rms_norm(x, w, -1.0)
    with pytest.raises(ValueError, match="pre_weight was given without a residual"):
        rms_norm(x, w, EPS, pre_weight=w, pre_eps=EPS)
    with pytest.raises(ValueError, match="pre_weight must have shape"):
        rms_norm(x, w, EPS, residual=residual, pre_weight=w[:7], pre_eps=EPS)
    with pytest.raises(ValueError, match="pre_eps must be"):
        rms_norm(x, w, EPS, residual=residual, pre_weight=w)
    with pytest.raises(ValueError, match="x with shape .* cannot be viewed as rows"):
        rms_norm(randn(3, 2, 8).transpose(0, 1), w, EPS)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm(torch.ones(4, 8, dtype=torch.long, device=DEVICE), w, EPS)
    with pytest.raises(ValueError, match="gate_up must be \\[..., 2 \\* I\\]"):
        swiglu(randn(4, 7))
    with pytest.raises(ValueError, match="out must have shape \\(4, 4\\)"):
        swiglu(randn(4, 8), out=nan_like((4, 8), torch.float32))
    with pytest.raises(TypeError, match="out has dtype torch.float16"):
        swiglu(randn(4, 8), out=nan_like((4, 4), torch.float16))
    with pytest.raises(ValueError, match="gate_up must have a unit stride"):
        swiglu(randn(8, 4).T)
    with pytest.raises(ValueError, match="gate_up is on meta"):
        swiglu(torch.empty(4, 8, device="meta"))
