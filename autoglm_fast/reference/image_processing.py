"""Image preprocessing for the CLIP vision tower, matching HF's (PIL) `CLIPImageProcessor`.

Pipeline per image: RGB (alpha composited onto white) -> bicubic resize of the shortest edge to
`image_size` -> center crop -> x/255 -> (x - mean) / std. Pillow is an optional extra, imported lazily.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from autoglm_fast.config import VisionConfig

if TYPE_CHECKING:
    from PIL import Image as PILImage


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image preprocessing needs Pillow: pip install autoglm-fast[serve]") from e
    return Image


def _to_rgb(img: "PILImage.Image") -> "PILImage.Image":
    Image = _pil()
    # Like HF's convert_to_rgb: transparent pixels become white, not whatever colour hides under alpha=0.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: Any) -> "PILImage.Image":
    """Open `source` as an RGB PIL image.

    Accepts a PIL image, a file path (str / Path), encoded bytes in any format Pillow reads, or a uint8
    numpy array HxW, HxWx1, HxWx3 or HxWx4 (RGBA).
    """
    Image = _pil()
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise TypeError(f"image array must be uint8, got dtype {source.dtype}")
        if not (source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (1, 3, 4))):
            raise ValueError(f"image array must be HxW or HxWxC with C in (1, 3, 4), got shape {source.shape}")
        if source.size == 0:
            raise ValueError(f"image array is empty, shape {source.shape}")
        arr = source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {str(source)!r}")
        data, what = path.read_bytes(), f"image file {str(source)!r}"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), f"image bytes ({len(source)} bytes)"
    else:
        raise TypeError("image must be a PIL image, a path, encoded bytes or a uint8 numpy array, "
                        f"got {type(source).__name__}")
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now so truncated / corrupt data fails here, with context
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"could not decode {what}: {e}") from e


def _resize_shortest_edge(img: "PILImage.Image", size: int) -> "PILImage.Image":
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # HF (get_resize_output_image_size) truncates, not rounds
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample=_pil().Resampling.BICUBIC)


def preprocess_images(images: Any | Sequence[Any], config: VisionConfig) -> torch.Tensor:
    """Images (one, or a list of anything `load_image` accepts) -> pixel values [N, 3, S, S] float32."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images got an empty list of images")
    s = config.image_size
    mean = torch.tensor(config.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config.image_std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for image in images:
        arr = np.asarray(_resize_shortest_edge(load_image(image), s))  # H x W x 3 uint8
        top, left = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
        crop = torch.from_numpy(arr[top:top + s, left:left + s].transpose(2, 0, 1).copy())
        # Same arithmetic as HF: rescale in float64 then cast, normalize in float32.
        x = (crop.double() * (1 / 255)).float()
        out.append((x - mean) / std)
    return torch.stack(out)
