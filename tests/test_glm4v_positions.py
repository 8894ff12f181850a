"""GLM-4.1V M-RoPE positions against transformers' own get_rope_index and generation bookkeeping.

The transformers model is built on the meta device: get_rope_index and compute_3d_position_ids only
read the config and make their tensors on input_ids' device, so no weights are needed."""
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoglm_fast.families.glm4v.config import Glm4vConfig  # noqa: E402
from autoglm_fast.families.glm4v.positions import decode_positions, mrope_positions  # noqa: E402

PRESETS = ("glm4v-tiny", "glm-4.1v-9b")


@pytest.fixture(scope="module")
def hf_model():
    cfg = Glm4vConfig.preset("glm4v-tiny")  # get_rope_index reads only spatial_merge_size (2 in both presets)
    with torch.device("meta"):
        return transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(**cfg.to_hf()))


def _token_types(ids: torch.Tensor, cfg: Glm4vConfig) -> torch.Tensor:
    # The processor's own rule (image tokens outside video spans -> 1), called with a stand-in `self`.
    fake = SimpleNamespace(image_token_id=cfg.image_token_id, video_start_id=cfg.video_start_token_id,
                           video_end_id=cfg.video_end_token_id)
    return torch.tensor(transformers.Glm4vProcessor.create_mm_token_type_ids(fake, [ids.tolist()]))


def _prompt(cfg: Glm4vConfig, *parts) -> list[int]:
    """parts: an int n = n text tokens; a (t, h, w) grid = begin, that image's tokens, end, as the
    processor writes them; (t, h, w, "bare") = the image tokens alone."""
    ids, nxt = [], 11
    for p in parts:
        if isinstance(p, int):
            ids += list(range(nxt, nxt + p))
            nxt += p
            continue
        image = [cfg.image_token_id] * (p[0] * p[1] * p[2] // cfg.merge_unit)
        ids += image if len(p) == 4 else [cfg.image_start_token_id, *image, cfg.image_end_token_id]
    return ids


def _hf(model, ids: list[int], grids, cfg: Glm4vConfig):
    x = torch.tensor([ids])
    grid = None if grids is None else torch.tensor(grids)
    pos, delta = model.model.get_rope_index(x, _token_types(x[0], cfg), image_grid_thw=grid)
    return pos[:, 0], int(delta[0, 0])


CASES = {
    "text_only": ((17,), None),
    "one_image": ((3, (1, 4, 6), 5), [[1, 4, 6]]),
    "two_images": ((2, (1, 4, 6), 3, (1, 6, 2), 4), [[1, 4, 6], [1, 6, 2]]),
    "image_first": (((1, 6, 4, "bare"), 3), [[1, 6, 4]]),
    "image_t2": ((2, (2, 4, 4), 3, (1, 2, 8), 1), [[2, 4, 4], [1, 2, 8]]),
    # t > the grid's h and w: transformers still advances by max(h, w), so the text after the image
    # reuses positions below the image's max (never happens for real images, which have t = 1).
    "image_t_tall": ((2, (4, 2, 4, "bare"), 1), [[4, 2, 4]]),
}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_get_rope_index(hf_model, preset, case):
    cfg = Glm4vConfig.preset(preset)
    parts, grids = CASES[case]
    ids = _prompt(cfg, *parts)
    ref_pos, ref_delta = _hf(hf_model, ids, grids, cfg)
    for x in (ids, torch.tensor(ids)):
        pos, delta = mrope_positions(x, None if grids is None else torch.tensor(grids), cfg)
        assert pos.dtype == torch.long and pos.shape == (3, len(ids))
        assert torch.equal(pos, ref_pos), case
        assert delta == ref_delta


def test_hand_checked_example():
    cfg = Glm4vConfig.preset("glm4v-tiny")
    pos, delta = mrope_positions([1, 2] + [cfg.image_token_id] * 6 + [3], torch.tensor([[1, 4, 6]]), cfg)
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5], [0, 1, 2, 2, 2, 3, 3, 3, 5], [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert delta == -3


class _FakeCache:
    def __init__(self, n):
        self.n = n

    def get_seq_length(self, *_):
        return self.n


@pytest.mark.parametrize("case", ["text_only", "one_image", "two_images", "image_t2"])
def test_decode_matches_transformers(hf_model, case):
    cfg = Glm4vConfig.preset("glm4v-tiny")
    parts, grids = CASES[case]
    ids = _prompt(cfg, *parts)
    T = len(ids)
    prompt_pos, delta = mrope_positions(ids, None if grids is None else torch.tensor(grids), cfg)
    x = torch.tensor([ids])
    kw = {"input_ids": x, "mm_token_type_ids": _token_types(x[0], cfg), "attention_mask": torch.ones_like(x)}
    if grids is not None:
        kw["image_grid_thw"] = torch.tensor(grids)

    # generate(): [4, B, T] positions (row 0 = text), then each step appends last column + 1.
    pos = hf_model._prepare_position_ids_for_generation(x, dict(kw))
    assert torch.equal(pos[1:, 0], prompt_pos)
    kwargs = {"position_ids": pos}
    for _ in range(5):
        kwargs = hf_model._update_model_kwargs_for_generation({}, kwargs, num_new_tokens=1)
    assert torch.equal(kwargs["position_ids"][1:, 0, T:], decode_positions(T, 5, delta))

    # Glm4vModel.forward with a cache and no position_ids: cached rope_deltas + cache positions.
    if grids is None:
        return  # without image grids transformers uses plain arange(past, past + n), i.e. delta 0
    model = hf_model.model
    model.rope_deltas = None
    model.compute_3d_position_ids(x, None, torch.tensor(grids), cache=None, mm_token_type_ids=kw["mm_token_type_ids"])
    for past, n in ((T, 1), (T + 7, 3)):
        new = torch.tensor([[12] * n])
        got = model.compute_3d_position_ids(new, torch.zeros(1, n, 4), torch.tensor(grids), cache=_FakeCache(past),
                                            mm_token_type_ids=torch.zeros_like(new))
        assert torch.equal(got[:, 0], decode_positions(past, n, delta))


def test_decode_positions_shape():
    got = decode_positions(10, 3, -4)
    assert got.tolist() == [[6, 7, 8]] * 3 and got.dtype == torch.long
    assert decode_positions(5, 0, 2).shape == (3, 0)
    with pytest.raises(ValueError):
        decode_positions(-1, 1, 0)


def test_swapped_grid_changes_positions():
    cfg = Glm4vConfig.preset("glm4v-tiny")
    ids = _prompt(cfg, 3, (1, 4, 6), 5)
    good = mrope_positions(ids, torch.tensor([[1, 4, 6]]), cfg)[0]
    bad = mrope_positions(ids, torch.tensor([[1, 6, 4]]), cfg)[0]
    assert not torch.equal(good, bad)


def test_validation():
    cfg = Glm4vConfig.preset("glm4v-tiny")
    ids = _prompt(cfg, 3, (1, 4, 6), 5)  # 6 image tokens
    with pytest.raises(ValueError, match=r"6 image tokens .* 8"):
        mrope_positions(ids, torch.tensor([[1, 4, 8]]), cfg)
    with pytest.raises(ValueError, match=r"6 image tokens .* 0"):
        mrope_positions(ids, None, cfg)
    with pytest.raises(ValueError, match=r"0 image tokens .* 6"):
        mrope_positions([1, 2, 3], torch.tensor([[1, 4, 6]]), cfg)
    # Right total, wrong split between two runs.
    two = _prompt(cfg, 1, (1, 4, 6), 1, (1, 2, 4), 1)
    with pytest.raises(ValueError, match="image 0"):
        mrope_positions(two, torch.tensor([[1, 2, 4], [1, 4, 6]]), cfg)
    with pytest.raises(ValueError, match="divisible"):
        mrope_positions(ids, torch.tensor([[1, 3, 8]]), cfg)
    for tok in (cfg.video_token_id, cfg.video_start_token_id):
        with pytest.raises(ValueError, match="video inputs are not supported"):
            mrope_positions([1, tok, 2], None, cfg)
    with pytest.raises(ValueError):
        mrope_positions([], None, cfg)
