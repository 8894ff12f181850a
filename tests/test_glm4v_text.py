"""The GLM-4.1V decoder (our GLM with M-RoPE and sandwich norms) against transformers' Glm4vTextModel."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from autoglm_fast.families.glm4v.config import Glm4vConfig  # noqa: E402
from autoglm_fast.reference.glm import GlmModel, make_caches  # noqa: E402

TOL = 1e-4  # fp32, max abs over hidden states of rms ~1


def _pair(config=None, seed=0):
    cfg = config or Glm4vConfig.preset("glm4v-tiny")
    hf_cfg = transformers.Glm4vConfig(**{k: v for k, v in cfg.to_hf().items()
                                         if k not in ("architectures", "model_type")}).text_config
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.Glm4vTextModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms and biases away from 1 / 0, so a skipped one shows
            p.add_(torch.randn_like(p) * 0.05)
    ours = GlmModel(cfg.text).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"rotary_emb.inv_freq", "rotary_emb.original_inv_freq"}
    return cfg, hf, ours


def _image_like_positions(T: int) -> torch.Tensor:
    """[3, 1, T]: text 0..3, a 2x3 image grid at 4, then text after the grid's max + 1."""
    t = list(range(4)) + [4] * 6 + list(range(7, 7 + T - 10))
    h = list(range(4)) + [4, 4, 4, 5, 5, 5] + list(range(7, 7 + T - 10))
    w = list(range(4)) + [4, 5, 6, 4, 5, 6] + list(range(7, 7 + T - 10))
    return torch.tensor([t, h, w])[:, None]


def test_decoder_matches_transformers_with_mrope_positions():
    cfg, hf, ours = _pair()
    T = 17
    x = torch.randn(1, T, cfg.text.hidden_size)
    rope = _image_like_positions(T)
    with torch.no_grad():
        want = hf(inputs_embeds=x, position_ids=rope).last_hidden_state
        got = ours(x, torch.arange(T)[None], rope_positions=rope)
        plain = ours(x, torch.arange(T)[None])  # 1-D positions: every axis the same (text-only rule)
        want_plain = hf(inputs_embeds=x, position_ids=torch.arange(T)[None]).last_hidden_state
    assert (got - want).abs().max() < TOL
    assert (plain - want_plain).abs().max() < TOL
    # teeth: the image positions matter, and a 1 % error fails
    assert (plain - want).abs().max() > 100 * TOL
    assert (got * 1.01 - want).abs().max() > TOL


def test_incremental_decode_with_cache_equals_the_full_forward():
    cfg, _, ours = _pair()
    T = 15
    x = torch.randn(1, T, cfg.text.hidden_size)
    rope = _image_like_positions(T)
    with torch.no_grad():
        full = ours(x, torch.arange(T)[None], rope_positions=rope)
        caches = make_caches(cfg.text, 1, 32, x)
        first = ours(x[:, :11], torch.arange(11)[None], caches, rope_positions=rope[:, :, :11])
        steps = [ours(x[:, i:i + 1], torch.tensor([[i]]), caches, rope_positions=rope[:, :, i:i + 1])
                 for i in range(11, T)]
    got = torch.cat([first] + steps, dim=1)
    assert (got - full).abs().max() < TOL


def test_each_glm41v_feature_is_needed():
    """Sandwich norms off, or another mrope split, gives a different answer: the parity above has teeth."""
    cfg, hf, _ = _pair()
    T = 17
    x = torch.randn(1, T, cfg.text.hidden_size)
    rope = _image_like_positions(T)
    with torch.no_grad():
        want = hf(inputs_embeds=x, position_ids=rope).last_hidden_state
    for change in ({"sandwich_norms": False}, {"mrope_section": (1, 2, 1)}):
        text = dataclasses.replace(cfg.text, **change)
        model = GlmModel(text).eval()
        model.load_state_dict(hf.state_dict(), strict=False)
        with torch.no_grad():
            got = model(x, torch.arange(T)[None], rope_positions=rope)
        assert (got - want).abs().max() > 100 * TOL, change
