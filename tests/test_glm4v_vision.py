"""Parity of the eager GLM-4.1V vision tower with transformers' Glm4vVisionModel (the oracle).

Errors are max-abs over the merged output, divided by the output's max-abs (outputs are O(1) here).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel as HFGlm4vVisionModel  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from autoglm_fast.families.glm4v.config import Glm4vConfig  # noqa: E402
from autoglm_fast.families.glm4v.vision import Glm4vVisionModel, vision_cu_seqlens  # noqa: E402
from glm4v_checkpoint import randomize_vision as randomize  # noqa: E402

TOL = 1e-4
GLM41V_VISION_PARAMS = 892_498_432  # GLM-4.1V-9B's tower, downsample and merger included


def hf_config(cfg, **extra) -> transformers.Glm4vVisionConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "rope_theta"}
    return transformers.Glm4vVisionConfig(**fields, **extra,
                                          rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta})


@pytest.fixture(scope="module")
def pair():
    cfg = Glm4vConfig.preset("glm4v-tiny").vision
    torch.manual_seed(0)
    hf = HFGlm4vVisionModel(hf_config(cfg, attn_implementation="sdpa")).eval()
    randomize(hf)
    ours = Glm4vVisionModel(cfg).eval()
    hf_sd = hf.state_dict()
    assert set(hf_sd) == set(ours.state_dict())
    ours.load_state_dict(hf_sd, strict=True)
    return cfg, hf, ours


def run_both(cfg, hf, ours, grids, dtype=torch.float32, **kw):
    grid_thw = torch.tensor(grids, dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), cfg.patch_dim, generator=g)
    with torch.no_grad():
        ref = hf(pixels.to(dtype), grid_thw).pooler_output
        out = ours(pixels.to(dtype), grid_thw, **kw)
    assert out.shape == ref.shape == (pixels.shape[0] // cfg.spatial_merge_size ** 2, cfg.out_hidden_size)
    return out.float(), ref.float()


def rel_err(out, ref) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


GRIDS = {
    "one_4x6": [[1, 4, 6]],
    "two_4x6_6x4": [[1, 4, 6], [1, 6, 4]],
    "three_mixed": [[1, 2, 8], [1, 6, 2], [1, 4, 4]],
    "bigger_than_table_8x10": [[1, 8, 10]],  # upsampled past the 4x4 table: bicubic + border clamp
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_fp32_matches_transformers(pair, name):
    cfg, hf, ours = pair
    out, ref = run_both(cfg, hf, ours, GRIDS[name])
    assert rel_err(out, ref) < TOL, rel_err(out, ref)


def test_bf16_matches_transformers(pair):
    cfg, hf, ours = pair
    hf16, ours16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (hf, ours))
    # from_pretrained(dtype=bf16) keeps inv_freq fp32 (it is computed in fp32); .to() would round it
    hf16.rotary_pos_emb.inv_freq = hf.rotary_pos_emb.inv_freq.clone()
    out, ref = run_both(cfg, hf16, ours16, GRIDS["two_4x6_6x4"], dtype=torch.bfloat16)
    assert rel_err(out, ref) < 1e-2, rel_err(out, ref)  # a few bf16 ulps (bitwise equal on x86 CPU)


def test_pieces_match_transformers(pair):
    cfg, hf, ours = pair
    grid_thw = torch.tensor(GRIDS["two_4x6_6x4"])
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(int(grid_thw.prod(-1).sum()), cfg.patch_dim, generator=g)
    with torch.no_grad():
        # Conv3d with kernel == stride == patch is the flattened GEMM, up to summation order (~6e-6 here)
        torch.testing.assert_close(ours.patch_embed(pixels), hf.patch_embed(pixels), rtol=1e-5, atol=1e-5)
        pos = get_vision_position_ids(grid_thw, cfg.spatial_merge_size)
        cos_ref, sin_ref = hf.rotary_pos_emb(pixels, pos)
        cos, sin = ours.vision_rotary(grid_thw)
        assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
        x = torch.randn(pixels.shape[0], cfg.hidden_size, generator=g)
        seg = vision_cu_seqlens(grid_thw)
        ref = hf.embeddings(x, seg.diff(), grid_thw, pos[:, 0], pos[:, 1])
        assert torch.equal(ours.embeddings(x, grid_thw, pos), ref)
        conv = hf.downsample(x.view(-1, 2, 2, cfg.hidden_size).permute(0, 3, 1, 2)).flatten(1)
        torch.testing.assert_close(ours.downsample_tokens(x), conv, rtol=1e-5, atol=1e-5)


def test_tolerance_has_teeth(pair):
    cfg, hf, ours = pair
    grids = GRIDS["two_4x6_6x4"]
    out, ref = run_both(cfg, hf, ours, grids)
    assert rel_err(out, ref) < TOL
    assert rel_err(out * 1.01, ref) > TOL
    # one cu_seqlens segment for both images: patches attend across images
    leaky, ref = run_both(cfg, hf, ours, grids, cu_seqlens=torch.tensor([0, 48], dtype=torch.int32))
    assert rel_err(leaky, ref) > 100 * TOL, rel_err(leaky, ref)
    # the same patches read as 6x4 instead of 4x6: rows/cols swapped in RoPE and the position table
    transposed, ref = run_both(cfg, hf, ours, [[1, 4, 6]])
    swapped, _ = run_both(cfg, hf, ours, [[1, 6, 4]])
    assert rel_err(transposed, ref) < TOL and rel_err(swapped, ref) > 100 * TOL


def test_real_size_parameter_count():
    cfg = Glm4vConfig.preset("glm-4.1v-9b").vision
    with torch.device("meta"):
        ours = Glm4vVisionModel(cfg)
        hf = HFGlm4vVisionModel(transformers.Glm4vVisionConfig())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf) == GLM41V_VISION_PARAMS
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
