"""GLM-4.1V image preprocessing: bit-exact against transformers' `Glm4vImageProcessorPil`."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
glm4v_pil = pytest.importorskip("transformers.models.glm4v.image_processing_pil_glm4v")

from autoglm_fast.families.glm4v.image_processing import Glm4vImageProcessor, smart_resize  # noqa: E402


def _hf(**kw):
    return glm4v_pil.Glm4vImageProcessorPil(**kw)


def _hf_run(hf, images, **kw):
    out = hf(images, return_tensors="pt", **kw)
    return out["pixel_values"], out["image_grid_thw"]


def _assert_same(ours, theirs):
    (pv, grid), (hpv, hgrid) = ours, theirs
    assert pv.dtype == torch.float32 and grid.dtype == torch.int64
    assert torch.equal(grid, hgrid.to(torch.int64)), (grid, hgrid)
    assert pv.shape == hpv.shape
    # Same Pillow resize and the same float ops in the same order: exact, not merely close.
    assert torch.equal(pv, hpv), (pv - hpv).abs().max()


def _rand(h, w, seed, channels=3):
    shape = (h, w) if channels == 1 else (h, w, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("hw", [(37, 53), (300, 181), (90, 700), (500, 333), (12, 40)])
def test_matches_transformers_random_images(hw):
    img = _rand(*hw, seed=hw[0] * 1000 + hw[1])
    _assert_same(Glm4vImageProcessor().preprocess(img), _hf_run(_hf(), img))


@pytest.mark.parametrize("channels", [1, 4])
def test_matches_transformers_gray_and_rgba(channels):
    img = _rand(61, 87, seed=channels, channels=channels)
    assert img.mode == ("L" if channels == 1 else "RGBA")
    _assert_same(Glm4vImageProcessor().preprocess(img), _hf_run(_hf(), img))


def test_matches_transformers_batch_of_two_sizes():
    imgs = [_rand(120, 250, seed=1), _rand(333, 97, seed=2)]
    ours = Glm4vImageProcessor().preprocess(imgs)
    _assert_same(ours, _hf_run(_hf(), imgs))
    assert ours[1].shape[0] == 2


def test_settings_from_transformers_save_pretrained(tmp_path):
    hf = _hf(size={"shortest_edge": 56 * 56, "longest_edge": 200_000}, image_mean=[0.5, 0.4, 0.3],
             image_std=[0.2, 0.25, 0.3], rescale_factor=1 / 200)
    hf.save_pretrained(tmp_path)
    ours = Glm4vImageProcessor.load(tmp_path)
    assert (ours.min_pixels, ours.max_pixels, ours.image_mean) == (3136, 200_000, (0.5, 0.4, 0.3))
    hf2 = glm4v_pil.Glm4vImageProcessorPil.from_pretrained(tmp_path)
    for img in [_rand(400, 640, seed=3), _rand(30, 31, seed=4)]:
        _assert_same(ours.preprocess(img), _hf_run(hf2, img))


def test_missing_config_gives_transformers_defaults(tmp_path):
    ours, hf = Glm4vImageProcessor.load(tmp_path), _hf()
    assert (ours.min_pixels, ours.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert ours.image_mean == tuple(hf.image_mean) and ours.image_std == tuple(hf.image_std)
    assert ours.rescale_factor == hf.rescale_factor and ours.resample == int(hf.resample)


def test_open_autoglm_screenshot():
    # 1080 x 2400 phone screenshot, vLLM --mm-processor-kwargs '{"max_pixels": 5000000}'.
    img = _rand(2400, 1080, seed=5)
    proc = Glm4vImageProcessor().with_overrides(max_pixels=5_000_000)
    assert proc.grid_for(2400, 1080) == (1, 168, 74)
    pv, grid = proc.preprocess(img)
    assert grid.tolist() == [[1, 168, 74]] and pv.shape == (12_432, 3 * 2 * 14 * 14)
    assert proc.num_image_tokens(grid[0]) == 3_108
    _assert_same((pv, grid), _hf_run(_hf(), img, size={"shortest_edge": 112 * 112, "longest_edge": 5_000_000}))
    # Without the override (transformers' default budget) the same screenshot is larger.
    assert Glm4vImageProcessor().grid_for(2400, 1080) == (1, 172, 78)


def test_with_overrides_matches_transformers_and_rejects_unknown():
    img = _rand(700, 900, seed=6)
    size = {"shortest_edge": 112 * 112, "longest_edge": 300_000}
    ours = Glm4vImageProcessor().with_overrides(max_pixels=300_000).preprocess(img)
    _assert_same(ours, _hf_run(_hf(), img, size=size))
    _assert_same(Glm4vImageProcessor().with_overrides(size=size).preprocess(img), _hf_run(_hf(), img, size=size))
    # transformers' image processor itself does not take `max_pixels`; should it ever, it must mean the same.
    try:
        theirs = _hf_run(_hf(), img, max_pixels=300_000)
    except TypeError:
        pass
    else:
        _assert_same(ours, theirs)
    with pytest.raises(ValueError, match="max_pixel"):
        Glm4vImageProcessor().with_overrides(max_pixel=300_000)
    with pytest.raises(ValueError, match="longest_edge"):
        Glm4vImageProcessor().with_overrides(size={"longest_edge": 300_000})


def test_comparison_has_teeth():
    img = _rand(200, 300, seed=7)
    (pv, grid), (hpv, hgrid) = Glm4vImageProcessor().preprocess(img), _hf_run(_hf(), img)
    _assert_same((pv, grid), (hpv, hgrid))
    swapped = pv.clone()
    swapped[[0, 1]] = pv[[1, 0]]  # two patches of one merge window in the wrong order
    with pytest.raises(AssertionError):
        _assert_same((swapped, grid), (hpv, hgrid))
    wrong_mean = Glm4vImageProcessor(image_mean=(0.5, 0.5, 0.5)).preprocess(img)
    with pytest.raises(AssertionError):
        _assert_same(wrong_mean, (hpv, hgrid))
    # Row-major patches (no merge-window order) hold the same values in a different order.
    gh, gw = grid[0, 1:].tolist()
    x = pv.view(gh // 2, gw // 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(gh * gw, -1)
    with pytest.raises(AssertionError):
        _assert_same((x, grid), (hpv, hgrid))


@pytest.mark.parametrize("hw", [(1, 1), (27, 5000), (2400, 1080), (3000, 4000), (28, 28), (100, 5)])
def test_smart_resize_and_grid_match_transformers(hw):
    hf = _hf()
    mine = smart_resize(*hw, min_pixels=hf.size.shortest_edge, max_pixels=hf.size.longest_edge)
    theirs = glm4v_pil.smart_resize(2, *hw, min_pixels=hf.size.shortest_edge, max_pixels=hf.size.longest_edge)
    assert mine == theirs
    _, gh, gw = Glm4vImageProcessor().grid_for(*hw)
    assert gh * gw == hf.get_number_of_image_patches(*hw)


def test_errors():
    proc = Glm4vImageProcessor()
    with pytest.raises(ValueError, match="aspect ratio"):  # transformers: ratio > 200 after upscaling
        proc.preprocess(Image.new("RGB", (300, 1)))
    with pytest.raises(ValueError, match="aspect ratio"):
        _hf()(Image.new("RGB", (300, 1)))
    with pytest.raises(ValueError, match="empty"):
        proc.preprocess([])
    with pytest.raises(TypeError):
        proc.preprocess(3.5)
    with pytest.raises(ValueError, match="max_pixels"):
        proc.with_overrides(max_pixels=0)
    with pytest.raises(ValueError, match="size"):
        Glm4vImageProcessor.from_dict({"size": {"height": 224, "width": 224}})
    with pytest.raises(ValueError, match="RGB"):
        Glm4vImageProcessor(do_convert_rgb=False).preprocess(_rand(40, 40, seed=8, channels=4))


def test_from_dict_ignores_what_transformers_ignores(tmp_path):
    # A top-level max_pixels in preprocessor_config.json is stored but never read by transformers' processor.
    cfg = {"size": {"shortest_edge": 3136, "longest_edge": 500_000}, "max_pixels": 5, "image_processor_type": "x"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = Glm4vImageProcessor.load(tmp_path)
    hf = glm4v_pil.Glm4vImageProcessorPil.from_pretrained(tmp_path)
    assert (ours.min_pixels, ours.max_pixels) == (3136, 500_000)
    img = _rand(800, 600, seed=9)
    _assert_same(ours.preprocess(img), _hf_run(hf, img))
