"""GLM-4.1V's 3-row multimodal RoPE positions (temporal, height, width) for one sequence.

Mirrors transformers' `Glm4vModel.get_rope_index` (5.x) for images, so the engine can compute a
prompt's positions at admission time without the model: text advances all three rows together; an
image run gets its (t, h, w) indices over the LLM-token grid (patches / spatial_merge_size), offset
by the running position, which then advances by max(h, w) of that grid (not by t: images have t = 1).
Generated tokens sit at `cache_position + rope_delta` on all three rows, as `Glm4vModel.forward` does
once `rope_deltas` is cached.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .config import Glm4vConfig


def _grids(image_grid_thw, merge: int) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        return []
    grids = torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()
    for t, h, w in grids:
        # The vision tower merges merge x merge patches into one LLM token, so a grid it produced
        # always divides; anything else is a caller's bug, better caught here than as bad positions.
        if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
            raise ValueError(f"image_grid_thw row {(t, h, w)} must be positive with h and w divisible "
                             f"by spatial_merge_size={merge}")
    return [(int(t), int(h), int(w)) for t, h, w in grids]


def mrope_positions(input_ids: Sequence[int] | torch.Tensor, image_grid_thw: torch.Tensor | None,
                    config: Glm4vConfig) -> tuple[torch.Tensor, int]:
    """(positions [3, T] long, rope_delta) for one unpadded sequence; rope_delta = max position + 1 - T.

    Each maximal run of `image_token_id` is one image, taking `image_grid_thw` rows in order (as
    transformers' token-type grouping does; the processor wraps every image in begin/end tokens, so
    two images are never adjacent)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    # GLM-4.1V marks video frames with image tokens inside video_start/video_end (token type 2) and
    # needs video_grid_thw split per frame; this function takes image grids only.
    video = (ids == config.video_token_id) | (ids == config.video_start_token_id) | (ids == config.video_end_token_id)
    if bool(video.any()):
        raise ValueError("video inputs are not supported (found video tokens in input_ids)")
    merge = config.vision.spatial_merge_size
    grids = _grids(image_grid_thw, merge)
    is_image = ids == config.image_token_id
    n_tokens = int(is_image.sum())
    n_expected = sum(t * h * w // merge ** 2 for t, h, w in grids)
    if n_tokens != n_expected:
        raise ValueError(f"input_ids hold {n_tokens} image tokens but image_grid_thw accounts for {n_expected} "
                         f"(sum of t*h*w/{merge ** 2} over {len(grids)} image(s))")

    T = ids.numel()
    cuts = (torch.nonzero(is_image[1:] != is_image[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, T]
    pieces: list[torch.Tensor] = []
    pos = 0
    n_image = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if not bool(is_image[lo]):
            pieces.append(torch.arange(pos, pos + hi - lo).expand(3, -1))
            pos += hi - lo
            continue
        if n_image == len(grids):
            raise ValueError(f"input_ids hold more image runs than the {len(grids)} rows of image_grid_thw")
        t, h, w = grids[n_image]
        gh, gw = h // merge, w // merge
        if t * gh * gw != hi - lo:
            raise ValueError(f"image {n_image}: run of {hi - lo} image tokens at {lo} but its grid {(t, h, w)} "
                             f"needs {t * gh * gw}")
        n_image += 1
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(gh, gw)  # transformers: current_pos += max(h, w) // merge (t is not counted)
    if n_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but input_ids hold {n_image} image runs")
    positions = torch.cat(pieces, dim=1).contiguous()
    return positions, int(positions.max()) + 1 - T


def decode_positions(num_computed: int, count: int, rope_delta: int) -> torch.Tensor:
    """Positions [3, count] for tokens at cache positions num_computed .. num_computed+count-1 that
    follow the prompt: every row is cache_position + rope_delta (text advances all rows together)."""
    if num_computed < 0 or count < 0:
        raise ValueError(f"num_computed ({num_computed}) and count ({count}) must be >= 0")
    return (torch.arange(num_computed, num_computed + count) + rope_delta).expand(3, -1).contiguous()
