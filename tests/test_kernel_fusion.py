"""gated_fusion (per-sequence summary + row kernel) vs the eager math and the reference module."""
import pytest
import torch

from autoglm_fast.kernels.gated_fusion import ROWS, gated_fusion, reference_fusion
from autoglm_fast.reference.fusion import GatedFusion
from kernel_harness import (ALL_DTYPES, DEVICE, assert_matches, assert_within, nan_like, odd_sizes, randn,
                            reference_pair, requires_kernels, tolerance_failures)

pytestmark = requires_kernels


def _inputs(B, T, H, dtype, seed=0):
    torch.manual_seed(seed)
    return (randn(B, T, H, dtype=dtype), randn(3, 3 * H, dtype=dtype, scale=H ** -0.5), randn(3, dtype=dtype),
            randn(B, H, dtype=dtype), randn(B, H, dtype=dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)  # no dots: bf16 runs in the interpreter too (upcast to fp32)
@pytest.mark.parametrize("T", odd_sizes(4))    # T == 1 is the decode path (summary computed inline)
@pytest.mark.parametrize("B, H", [(1, 72), (3, 1041)])
@pytest.mark.parametrize("media", ["none", "vision", "both", "ragged"])
def test_matches_reference(dtype, T, B, H, media):
    t, w, b, v, a = _inputs(B, T, H, dtype, seed=T + H)
    kw = {"none": {}, "vision": {"v": v}, "both": {"v": v, "a": a},
          "ragged": {"v": v, "a": a, "has_v": torch.arange(B, device=DEVICE) % 2 == 0,
                     "has_a": torch.arange(B, device=DEVICE) >= 1}}[media]
    out = nan_like((B, T, H), dtype)
    got = gated_fusion(t, w, b, out=out, **kw)
    assert got is out
    assert_matches(got, reference_fusion, t, w, b, **kw)


# (B, T) whose B*T rows leave the last CTA partial: 1, ROWS-1, ROWS+1 and 2^5+17 rows, as decode steps (T == 1:
# every row its own sequence, summary inline) and as prefills whose sequences straddle CTAs.
ROW_SHAPES = [(1, 1), (ROWS - 1, 1), (ROWS + 1, 1), (49, 1), (1, ROWS - 1), (1, ROWS + 1), (3, ROWS + 1), (7, 7)]


def _ragged(B, v, a):
    """Every sequence gets its own presence pattern; an absent vector holds NaN, which must never leak."""
    i = torch.arange(B, device=DEVICE)
    has_v, has_a = i % 3 != 1, i % 2 == 0
    return {"v": torch.where(has_v[:, None], v, float("nan")), "a": torch.where(has_a[:, None], a, float("nan")),
            "has_v": has_v, "has_a": has_a}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B, T", ROW_SHAPES)
def test_partial_ctas_and_sequences_sharing_a_cta(dtype, B, T):
    """Rows are B*T flattened, ROWS to a CTA: each row must find its own sequence's summary, media and flags,
    and no row past the end may be written (the buffer's rows after the output stay NaN)."""
    H = 72
    t, w, b, v, a = _inputs(B, T, H, dtype, seed=B * 31 + T)
    kw = _ragged(B, v, a)
    buf = nan_like((B * T + ROWS, H), dtype)
    out = buf[:B * T].view(B, T, H)
    assert gated_fusion(t, w, b, out=out, **kw) is out
    assert_matches(out, reference_fusion, t, w, b, **kw)
    assert buf[B * T:].isnan().all()


def test_rows_of_one_cta_use_their_own_sequence():
    """Sequences that differ only in their media give different outputs row for row, as the reference does:
    a kernel reading the CTA's first row's sequence for all its rows fails here."""
    B, T, H = ROWS + 1, 1, 40
    t, w, b, v, a = _inputs(1, T, H, torch.float32)
    t = t.expand(B, T, H).contiguous()
    v, a = randn(B, H), randn(B, H)
    got = gated_fusion(t, w, b, v, a, out=nan_like((B, T, H), torch.float32))
    assert_matches(got, reference_fusion, t, w, b, v, a)
    assert (got[1:] - got[:1]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 allows more than 1%: its rounding x 3
@pytest.mark.parametrize("T", [1, ROWS + 1])
def test_tolerance_catches_one_row_off_by_one_percent(dtype, T):
    B, H = 3, 72
    t, w, b, v, a = _inputs(B, T, H, dtype)
    kw = _ragged(B, v, a)
    got = gated_fusion(t, w, b, out=nan_like((B, T, H), dtype), **kw)
    exact, eager = reference_pair(reference_fusion, t, w, b, **kw)
    assert_within(got, exact, eager)
    bad = got.clone()
    bad[B - 1, T - 1] *= 1.01
    assert tolerance_failures(bad, exact, eager)


def test_matches_reference_module():
    t, w, b, v, a = _inputs(2, 5, 72, torch.float32)
    module = GatedFusion(72).to(DEVICE)
    with torch.no_grad():
        module.gate.weight.copy_(w)
        module.gate.bias.copy_(b)
        has_v = torch.tensor([True, False], device=DEVICE)
        assert_matches(gated_fusion(t, w, b, v, a, has_v=has_v), module, t, v, a, has_v=has_v)


def test_absent_modality_is_exactly_zero_even_for_garbage_vectors():
    t, w, b, v, a = _inputs(2, 3, 72, torch.float32)
    garbage = torch.full_like(v, float("nan"))
    no = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    assert torch.equal(gated_fusion(t, w, b, garbage, garbage, has_v=no, has_a=no), gated_fusion(t, w, b))


def test_bad_inputs_name_the_argument():
    t, w, b, v, a = _inputs(2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape \\(3, 24\\)"):
        gated_fusion(t, w[:, :20], b)
    with pytest.raises(ValueError, match="v must have shape \\(2, 8\\)"):
        gated_fusion(t, w, b, v[:1])
    with pytest.raises(TypeError, match="a has dtype torch.float16"):
        gated_fusion(t, w, b, v, a.half())
    with pytest.raises(TypeError, match="has_v has dtype torch.int64"):
        gated_fusion(t, w, b, v, has_v=torch.ones(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="has_a marks rows present but a is None"):
        gated_fusion(t, w, b, v, has_a=torch.ones(2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="t with shape .* cannot be viewed as rows"):
        gated_fusion(randn(3, 2, 8).transpose(0, 1), w, b)
    with pytest.raises(ValueError, match="t is on meta"):
        gated_fusion(torch.empty(2, 3, 8, device="meta"), w, b)
