"""GLM-4.1V image preprocessing, bit-exact with transformers' `Glm4vImageProcessorPil` (5.x).

Per image: RGB (alpha onto white) -> Pillow bicubic resize to `smart_resize`'s multiple-of-28 size ->
x * (1/255) in float64, cast to float32 -> (x - mean) / std in float32 -> the frame repeated to
T = temporal_patch_size -> one row per 14x14 patch, rows in 2x2 merge-window order.

Pixel budgets: transformers' `size = {"shortest_edge": a, "longest_edge": b}` are *areas* (min/max pixels),
not edges, and count the duplicated frame: the budget bounds T * H * W = 2 * H * W. We hold them as
`min_pixels` / `max_pixels`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoglm_fast.reference.image_processing import _pil, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 112 * 112,
                 max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144, temporal_factor: int = 2) -> tuple[int, int]:
    """(height, width) -> (H, W), multiples of `factor`, with temporal_factor * H * W within the budget.

    transformers' image case: num_frames == temporal_factor (one frame padded to T=2). Same float ops, same
    order, so the same integers come out."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be positive, got {height}x{width}")
    num_frames = temporal_factor
    if height < factor or width < factor:  # tiny images are first scaled up so the short side is `factor`
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Glm4vImageProcessor:
    """What `preprocessor_config.json` holds; defaults are transformers' class defaults for this processor."""
    min_pixels: int = 112 * 112            # size["shortest_edge"]
    max_pixels: int = 28 * 28 * 15000      # size["longest_edge"] (not smart_resize's own default)
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3                      # PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {v!r}")
            object.__setattr__(self, name, tuple(float(x) for x in v))
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must be nonzero, got {self.image_std}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Glm4vImageProcessor":
        """From a preprocessor_config.json dict. Keys transformers ignores for this processor (including a
        top-level `min_pixels` / `max_pixels`: it stores but never reads them) are ignored here too."""
        d = dict(d)
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d and f.name not in _PIXEL_KEYS}
        if d.get("size") is not None:
            kw.update(_size_to_pixels(d["size"]))
        return cls(**kw)

    @classmethod
    def load(cls, directory: str | Path) -> "Glm4vImageProcessor":
        path = Path(directory) / "preprocessor_config.json"
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()

    def with_overrides(self, **overrides: Any) -> "Glm4vImageProcessor":
        """A copy with `mm_processor_kwargs`-style overrides: any field, `size` (as transformers takes it), or
        `min_pixels` / `max_pixels` (= size's shortest_edge / longest_edge; they win over `size`).

        NB transformers' Glm4v processors do not take `max_pixels` themselves (a TypeError from the image
        processor, dropped with a warning by Glm4vProcessor); the way to say it there is
        `size={"shortest_edge": min_pixels, "longest_edge": max_pixels}`, which is what this means."""
        names = {f.name for f in dataclasses.fields(self)}
        kw: dict[str, Any] = {}
        for key, value in overrides.items():
            if key == "size":
                kw.update(_size_to_pixels(value))
            elif key not in names:
                raise ValueError(f"unknown image processor override {key!r}; known: {sorted(names | {'size'})}")
        kw.update({k: v for k, v in overrides.items() if k != "size"})
        return dataclasses.replace(self, **kw)

    def grid_for(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of a height x width image, without touching pixels (for token counting)."""
        if self.do_resize:
            height, width = smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                                         self.max_pixels, self.temporal_patch_size)
        return 1, height // self.patch_size, width // self.patch_size

    def num_image_tokens(self, grid_thw_row: Any) -> int:
        """LLM placeholder tokens for one image: each merge_size x merge_size window becomes one token."""
        t, h, w = (int(x) for x in grid_thw_row)
        return t * h * w // self.merge_size ** 2

    def preprocess(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One image or a list (PIL, path, encoded bytes, uint8 array) -> (pixel_values float32
        [total_patches, 3 * T * P * P], image_grid_thw int64 [num_images, 3])."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is an empty list")
        patches, grids = [], []
        for image in images:
            p, grid = self._one(image)
            patches.append(p)
            grids.append(grid)
        return torch.cat(patches), torch.tensor(grids, dtype=torch.int64)

    def _one(self, image: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
        Image = _pil()
        if self.do_convert_rgb or not isinstance(image, Image.Image):
            img = load_image(image)  # the same alpha-onto-white conversion transformers applies
        elif image.mode != "RGB":
            raise ValueError(f"image has mode {image.mode!r}; with do_convert_rgb=False it must be RGB")
        else:
            img = image
        if img.width == 0 or img.height == 0:
            raise ValueError(f"image is empty ({img.width}x{img.height})")
        _, gh, gw = self.grid_for(img.height, img.width)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if self.do_resize:
            img = img.resize((gw * p, gh * p), resample=self.resample)
        elif img.height % (p * m) or img.width % (p * m):
            raise ValueError(f"with do_resize=False the image's sides must be multiples of {p * m}, "
                             f"got {img.width}x{img.height}")
        x = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())  # [3, H, W] uint8
        # transformers: rescale in float64 then cast to float32; normalize in float32 (its uint8 -> float32 if
        # not rescaled). Subtraction and division round the same in numpy and torch.
        x = (x.double() * self.rescale_factor).float() if self.do_rescale else x.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        c = x.shape[0]
        # [C, gh/m, m, P, gw/m, m, P] -> [gh/m, gw/m, m, m, C, P, P]: rows walk merge windows, then the 2x2
        # inside each; a patch row is (C, T, P, P) with the one frame repeated T times.
        x = x.view(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
        x = x.expand(-1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, c * t * p * p)
        return x, (1, gh, gw)


_PIXEL_KEYS = ("min_pixels", "max_pixels")


def _size_to_pixels(size: Any) -> dict[str, int]:
    # transformers' GLM-4V resize needs both keys (else a ValueError at call time); we fail at load time.
    if not isinstance(size, dict) or not size.get("shortest_edge") or not size.get("longest_edge"):
        raise ValueError(f"size must be a dict with 'shortest_edge' and 'longest_edge' (pixel counts), got {size!r}")
    return {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}
