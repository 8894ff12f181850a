"""GLM-4.1V's vision tower on Triton: varlen attention (the adapter kernel over cu_seqlens segments), the
2D RoPE kernel, and the whole fast tower (apply_fast_kernels) against the eager reference.

Bugs each test is there for: a query seeing another image's keys (cu_seqlens ignored or off by one), a
row of a short segment left unwritten or written by a longer one's program, q/k rotated with the wrong
half pairing or sign (or v rotated), a gate/up swap in the fused MLP weight, a residual fused in the wrong
order, and the swap missing a layer."""
import copy
import warnings

import pytest
import torch

from autoglm_fast.families.glm4v.config import Glm4vConfig
from autoglm_fast.families.glm4v.fast import FastGlm4vVisionAttention, FastGlm4vVisionBlock, FastGlm4VisionMlp
from autoglm_fast.families.glm4v.vision import Glm4vVisionModel, vision_cu_seqlens
from autoglm_fast.fast import FastRMSNorm, apply_fast_kernels
from autoglm_fast.fast.base import FastModule
from autoglm_fast.kernels import adapter_attention as attn_mod
from autoglm_fast.kernels.adapter_attention import reference_varlen_attention, varlen_attention
from autoglm_fast.kernels.utils import forced_config
from autoglm_fast.kernels.vision_rope import reference_vision_rope, vision_rope_
from glm4v_checkpoint import randomize_vision as randomize  # noqa: E402
from kernel_harness import (ALL_DTYPES, DEVICE, assert_matches, assert_within, nan_like, randn, reference_pair,
                            requires_kernels, tolerance_failures)

pytestmark = requires_kernels
HALF_DTYPES = [pytest.param(d, marks=pytest.mark.gpu, id=str(d)[6:]) for d in (torch.float16, torch.bfloat16)]
DTYPES = [torch.float32, *HALF_DTYPES]  # tl.dot in 16 bits: GPU only here (fp32 is the interpreter's case)
# Segment lengths: one image of 1x2x2 patches; two images of different non-square grids (4x6, 10x8); a
# 2^k + 17 segment between a 17 and an empty one (blocks of every config end mid-segment).
SEGMENTS = {"one_2x2": [4], "two_4x6_10x8": [24, 80], "81_17_0_5": [81, 17, 0, 5]}


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed(lengths, heads, head_dim, dtype, seed=0):
    torch.manual_seed(seed)
    return randn(sum(lengths), 3 * heads * head_dim, dtype=dtype, scale=2.0), cu(lengths)


# ---- varlen attention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SEGMENTS))
@pytest.mark.parametrize("heads, head_dim", [(2, 128), (3, 64), (2, 24)])
def test_varlen_matches_reference(dtype, name, heads, head_dim):
    lengths = SEGMENTS[name]
    qkv, cu_seqlens = packed(lengths, heads, head_dim, dtype)
    out = nan_like((qkv.shape[0], heads * head_dim), dtype)
    got = varlen_attention(qkv, heads, cu_seqlens, max(lengths), out=out)
    assert got is out
    assert_matches(got, reference_varlen_attention, qkv, heads, cu_seqlens)
    if len(lengths) > 1:  # the default grid bound (all N rows, no host sync) gives the same answer
        assert torch.equal(varlen_attention(qkv, heads, cu_seqlens), got)


@pytest.mark.parametrize("index", range(len(attn_mod.ATTN_CONFIGS)))
def test_varlen_each_config(index):
    """test_kernel_configs forces every config on the padded launch; here on the varlen one at head_dim 128."""
    kernel = attn_mod.adapter_attention_kernel
    qkv, cu_seqlens = packed([145, 17], 1, 128, torch.float32, seed=index)
    with forced_config(kernel, kernel.all_configs[index]):
        got = varlen_attention(qkv, 1, cu_seqlens, 145, out=nan_like((162, 128), torch.float32))
    assert_matches(got, reference_varlen_attention, qkv, 1, cu_seqlens)


def test_segment_equals_the_image_alone_and_ignoring_cu_seqlens_fails():
    """Teeth: one segment over both images (keys leak across images) fails the rule; each image's rows
    equal the padded kernel run on that image alone."""
    lengths = [24, 60]
    qkv, cu_seqlens = packed(lengths, 2, 128, torch.float32)
    got = varlen_attention(qkv, 2, cu_seqlens, 60)
    alone = attn_mod.adapter_attention(qkv[None, 24:], 2)[0]
    assert torch.allclose(got[24:], alone, rtol=1e-5, atol=1e-6)
    exact, eager = reference_pair(reference_varlen_attention, qkv, 2, cu_seqlens)
    assert_within(got, exact, eager)
    leaky = varlen_attention(qkv, 2, cu([84]))
    assert tolerance_failures(leaky, exact, eager)
    shifted = varlen_attention(qkv, 2, cu([25, 59]))  # a boundary off by one
    assert tolerance_failures(shifted, exact, eager)


def test_padded_launch_at_head_dim_128():
    qkv = randn(2, 33, 3 * 2 * 128)
    mask = torch.arange(33, device=DEVICE)[None] >= torch.tensor([33, 20], device=DEVICE)[:, None]
    got = attn_mod.adapter_attention(qkv, 2, mask, out=nan_like((2, 33, 256), torch.float32))
    assert_matches(got, attn_mod.reference_attention, qkv, 2, mask)


def test_varlen_bad_inputs_name_the_argument():
    qkv = randn(6, 48)
    with pytest.raises(TypeError, match="cu_seqlens has dtype torch.int64"):
        varlen_attention(qkv, 2, torch.tensor([0, 6], device=DEVICE))
    with pytest.raises(ValueError, match="qkv must be 2-D"):
        varlen_attention(randn(1, 6, 48), 2, cu([6]))
    with pytest.raises(ValueError, match="max_seqlen must be an int in \\[0, N=6\\]"):
        varlen_attention(qkv, 2, cu([6]), 7)
    with pytest.raises(ValueError, match="qkv's last dimension 48"):
        varlen_attention(qkv, 5, cu([6]))
    assert varlen_attention(randn(0, 48), 2, cu([])).shape == (0, 16)


# ---- 2D RoPE ---------------------------------------------------------------------------------------------
def rope_tables(n, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(n, head_dim, generator=g) * 50  # both halves free: the kernel must not assume them equal
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n, heads, head_dim", [(1, 1, 128), (81, 3, 128), (17, 2, 24)])
def test_rope_matches_reference_in_place(dtype, n, heads, head_dim):
    torch.manual_seed(n)
    qkv = randn(n, 3 * heads * head_dim, dtype=dtype)
    cos, sin = rope_tables(n, head_dim)
    got = qkv.clone()
    assert vision_rope_(got, cos, sin, heads) is got
    E = heads * head_dim
    assert torch.equal(got[:, 2 * E:], qkv[:, 2 * E:])  # v untouched
    ref = reference_vision_rope(qkv, cos, sin, heads)
    assert torch.equal(ref[:, 2 * E:], qkv[:, 2 * E:])
    exact, eager = reference_pair(reference_vision_rope, qkv, cos, sin, heads)
    assert_within(got.view(n, 2 * 3 * heads, -1), exact.view(n, 6 * heads, -1), eager.view(n, 6 * heads, -1))
    if dtype == torch.float32:  # fp32 in the interpreter: the reference's very roundings
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_rope_teeth_and_bad_inputs():
    qkv = randn(5, 3 * 2 * 16)
    cos, sin = rope_tables(5, 16)
    exact, eager = reference_pair(reference_vision_rope, qkv, cos, sin, 2)
    swapped = vision_rope_(qkv.clone(), sin, cos, 2)  # cos and sin mixed up
    assert tolerance_failures(swapped.view(5, 12, 8), exact.view(5, 12, 8), eager.view(5, 12, 8))
    with pytest.raises(TypeError, match="cos has dtype torch.float16"):
        vision_rope_(qkv, cos.half(), sin, 2)
    with pytest.raises(ValueError, match="sin must have shape \\(5, 16\\)"):
        vision_rope_(qkv, cos, sin[:4], 2)
    with pytest.raises(ValueError, match="head_dim 5 must be even"):
        vision_rope_(randn(5, 30), cos, sin, 2)


# ---- the fast tower --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def towers():
    cfg = Glm4vConfig.preset("glm4v-tiny").vision
    torch.manual_seed(0)
    ref = Glm4vVisionModel(cfg).eval()
    randomize(ref)
    ref = ref.to(DEVICE)
    fast = copy.deepcopy(ref)
    report = apply_fast_kernels(fast)
    return cfg, ref, fast, report


def tower_inputs(cfg, grids):
    grid_thw = torch.tensor(grids, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    return torch.randn(int(grid_thw.prod(-1).sum()), cfg.patch_dim, generator=g).to(DEVICE), grid_thw


def test_swap_covers_every_block_layer(towers):
    cfg, ref, fast, report = towers
    for block in fast.blocks:
        assert type(block) is FastGlm4vVisionBlock and type(block.attn) is FastGlm4vVisionAttention
        assert type(block.mlp) is FastGlm4VisionMlp and type(block.norm1) is type(block.norm2) is FastRMSNorm
    assert len(report.swapped) == cfg.depth * 5 + 2 and not report.skipped  # + post_conv / post_layernorm
    assert fast.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ref.state_dict().values()))
    mlp = fast.blocks[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()  # views into the fused weight


@pytest.mark.parametrize("grids", [[[1, 2, 2]], [[1, 4, 6], [1, 6, 4], [1, 2, 8]]], ids=["1x2x2", "three"])
def test_fast_tower_equals_reference(towers, grids):
    cfg, ref, fast, _ = towers
    pixels, grid_thw = tower_inputs(cfg, grids)
    with torch.no_grad():
        got = fast(pixels, grid_thw)
        assert_matches(got, ref, pixels, grid_thw)
        eager = ref(pixels, grid_thw)
    assert ((got - eager).abs().max() / eager.abs().max()).item() < 1e-4


def test_fast_tower_leak_across_images_fails(towers):
    cfg, ref, fast, _ = towers
    pixels, grid_thw = tower_inputs(cfg, [[1, 4, 6], [1, 6, 4]])
    with torch.no_grad():
        exact, eager = reference_pair(ref, pixels, grid_thw)
        leaky = fast(pixels, grid_thw, cu_seqlens=cu([48]))
        assert_within(fast(pixels, grid_thw, cu_seqlens=vision_cu_seqlens(grid_thw)), exact, eager)
    assert tolerance_failures(leaky, exact, eager)


def test_fast_attention_falls_back_where_kernels_cannot_run(towers):
    cfg, ref, fast, _ = towers
    FastModule._warned.clear()
    pixels, grid_thw = tower_inputs(cfg, [[1, 2, 2]])
    fast64, ref64 = copy.deepcopy(fast).double(), copy.deepcopy(ref).double()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(fast64(pixels.double(), grid_thw), ref64(pixels.double(), grid_thw))
    assert any("FastGlm4vVisionAttention: dtype torch.float64" in str(w.message) for w in caught)


# ---- GPU: the real tower's shapes ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[12_432], [2_604, 4_784, 12]], ids=["screenshot", "three"])
def test_real_shape_varlen_and_rope(dtype, lengths):
    """A 1080x2400 screenshot (12,432 patches), and three images packed; 2 of the 12 heads x 128 keep the
    fp64 reference's N^2 scores within memory (every head runs the same code)."""
    heads, head_dim = 2, 128
    qkv, cu_seqlens = packed(lengths, heads, head_dim, dtype)
    cos, sin = rope_tables(qkv.shape[0], head_dim)
    rotated = reference_vision_rope(qkv, cos, sin, heads)
    assert_within(vision_rope_(qkv.clone(), cos, sin, heads), *reference_pair(reference_vision_rope, qkv, cos, sin,
                                                                              heads))
    got = varlen_attention(rotated, heads, cu_seqlens, max(lengths), out=nan_like((qkv.shape[0], 256), dtype))
    assert_matches(got, reference_varlen_attention, rotated, heads, cu_seqlens)
