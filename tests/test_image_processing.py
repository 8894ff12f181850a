"""Image preprocessing: parity with HF's PIL CLIP image processor, input kinds, errors."""
import io

import numpy as np
import pytest
import torch

from autoglm_fast.config import VisionConfig
from autoglm_fast.reference.image_processing import load_image, preprocess_images

Image = pytest.importorskip("PIL.Image")
# Same PIL resize and the same float arithmetic as HF, so outputs match bit for bit (measured 0.0).
ATOL = 1e-5


def _hf(size: int, config: VisionConfig):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_mean=list(config.image_mean), image_std=list(config.image_std))


def _images(seed: int = 0):
    rng = np.random.default_rng(seed)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
           for h, w in [(37, 53), (224, 224), (300, 181), (42, 1000), (41, 42)]]
    gray = Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (60, 45, 4), dtype=np.uint8))
    palette = rgb[0].convert("P")
    return rgb + [gray, rgba, palette]


@pytest.mark.parametrize("size", [224, 42])
def test_matches_hf_clip_processor(size):
    config = VisionConfig(image_size=size, patch_size=14)
    hf = _hf(size, config)
    images = _images()
    ours = preprocess_images(images, config)
    assert ours.shape == (len(images), 3, size, size) and ours.dtype == torch.float32
    for i, img in enumerate(images):
        ref = hf(img, return_tensors="pt").pixel_values[0]
        assert (ours[i] - ref).abs().max().item() <= ATOL, (img.size, img.mode)


def test_custom_mean_std():
    config = VisionConfig(image_size=42, patch_size=14, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3))
    img = _images()[2]
    ref = _hf(42, config)(img, return_tensors="pt").pixel_values
    assert (preprocess_images(img, config) - ref).abs().max().item() <= ATOL


def test_input_kinds_agree(tmp_path):
    config = VisionConfig(image_size=42, patch_size=14)
    arr = np.random.default_rng(1).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    path = tmp_path / "img.png"
    path.write_bytes(buf.getvalue())
    want = preprocess_images(pil, config)
    for source in (arr, buf.getvalue(), path, str(path), pil.convert("RGBA")):
        torch.testing.assert_close(preprocess_images([source], config), want, atol=0, rtol=0)
    assert load_image(arr[..., 0]).mode == "RGB"
    assert np.array_equal(np.asarray(load_image(arr)), arr)


def test_transparency_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    assert (np.asarray(load_image(rgba)) == 255).all()


def test_errors(tmp_path):
    config = VisionConfig(image_size=42, patch_size=14)
    with pytest.raises(ValueError, match="image"):
        preprocess_images([], config)
    with pytest.raises(ValueError, match="could not decode image bytes"):
        load_image(b"not an image at all")
    with pytest.raises(ValueError, match="image bytes .* empty"):
        load_image(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="could not decode image"):
        load_image(buf.getvalue()[:60])  # truncated PNG
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ValueError, match="image file"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="image"):
        load_image(123)
    with pytest.raises(TypeError, match="image.*uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="image array"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="image array"):
        load_image(np.zeros((0, 4, 3), np.uint8))
