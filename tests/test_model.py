"""The assembled model: splicing at placeholders, per-sequence summaries, fusion, cached decoding."""
import dataclasses

import pytest
import torch

from agreement import assert_close_across_shapes, assert_greedy_agrees
from autoglm_fast.config import AutoGLMPhoneConfig, FusionConfig
from autoglm_fast.demo import build_prompt
from autoglm_fast.reference.generate import greedy_generate
from autoglm_fast.reference.glm import GlmForCausalLM
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM, pool_frames


@pytest.fixture(scope="module")
def nano():
    model = AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano"), seed=0)
    with torch.no_grad():  # larger random weights than the 0.02 init, so differences are visible
        for p in model.parameters():
            p.mul_(5)
    return model


def _media(cfg, n_images=1, samples=(16000,)):
    torch.manual_seed(1)
    px = torch.randn(n_images, 3, cfg.vision.image_size, cfg.vision.image_size)
    feats = torch.randn(len(samples), cfg.audio.num_mel_bins, 2 * cfg.audio.max_source_positions)
    return px, feats, list(samples)


def test_pool_frames_by_hand():
    frames = torch.arange(2 * 10 * 1, dtype=torch.float32).view(2, 10, 1)
    pooled, lengths = pool_frames(frames, [10, 5], 4)
    assert lengths.tolist() == [3, 2]
    assert pooled[0, :, 0].tolist() == [1.5, 5.5, 8.5]  # mean(0..3), mean(4..7), mean(8, 9)
    assert pooled[1, :2, 0].tolist() == [11.5, 14.0]    # mean(10..13), mean(14) - frames past 5 ignored
    assert pooled[1, 2, 0] == 0


@torch.no_grad()
def test_media_is_spliced_at_placeholders_and_text_is_fused(nano):
    cfg = nano.config
    px, feats, samples = _media(cfg)
    ids = torch.tensor([build_prompt(cfg, [1, 2, 3], cfg.audio.num_tokens(samples[0]))])
    images = nano.encode_images(px)
    audio = nano.encode_audio(feats, samples)
    assert images.shape == (1, cfg.vision.num_tokens, cfg.text.hidden_size)
    assert audio[0].shape == (cfg.audio.num_tokens(samples[0]), cfg.text.hidden_size)
    embeds, ctx = nano.embed(ids, images, audio)
    assert torch.equal(embeds[ids == cfg.image_token_id], images[0])
    assert torch.equal(embeds[ids == cfg.audio_token_id], audio[0])
    assert torch.allclose(ctx.vision[0], images[0].mean(0), atol=1e-6)
    assert torch.allclose(ctx.audio[0], audio[0].mean(0), atol=1e-6)
    text = (ids != cfg.image_token_id) & (ids != cfg.audio_token_id)
    t = nano.model.embed_tokens(ids)
    expect = nano.fusion(t, ctx.vision, ctx.audio, ctx.has_vision, ctx.has_audio)
    assert torch.equal(embeds[text], expect[text])


@torch.no_grad()
def test_placeholder_count_mismatch_is_a_clear_error(nano):
    cfg = nano.config
    px, feats, samples = _media(cfg)
    ids = torch.tensor([[cfg.image_token_id] * (cfg.vision.num_tokens - 1) + [5]])
    with pytest.raises(ValueError, match="9 image placeholder tokens but 10 image embeddings"):
        nano(ids, pixel_values=px)
    with pytest.raises(ValueError, match="0 audio placeholder tokens but 13 audio embeddings"):
        nano(torch.tensor([[5, 6]]), input_features=feats, audio_num_samples=samples)
    with pytest.raises(ValueError, match="go together"):
        nano(torch.tensor([[5, 6]]), input_features=feats)


@torch.no_grad()
def test_ragged_audio_batch_equals_each_clip_alone(nano):
    cfg = nano.config
    _, feats, samples = _media(cfg, samples=(16000, 3000, 32000))
    batched = nano.encode_audio(feats, samples)
    assert [len(x) for x in batched] == [13, 3, 25]
    for i, n in enumerate(samples):
        alone = nano.encode_audio(feats[i:i + 1], [n])[0]
        assert_close_across_shapes(batched[i], alone)


@torch.no_grad()
def test_batch_rows_get_their_own_media_summaries(nano):
    cfg = nano.config
    px, feats, samples = _media(cfg, n_images=1)
    n_img = cfg.vision.num_tokens
    row_img = [cfg.image_token_id] * n_img + [7, 8]
    row_txt = [9] * (n_img + 2)
    out = nano(torch.tensor([row_img, row_txt]), pixel_values=px)
    assert out.context.has_vision.tolist() == [True, False] and not out.context.has_audio.any()
    alone = nano(torch.tensor([row_txt])).logits
    assert_close_across_shapes(out.logits[1], alone[0])  # the text-only row ignores row 0's image


@torch.no_grad()
def test_fusion_disabled_text_path_is_exactly_glm():
    cfg = dataclasses.replace(AutoGLMPhoneConfig.preset("nano"), fusion=FusionConfig(enabled=False))
    model = AutoGLMPhoneForCausalLM.from_config(cfg, seed=3)
    glm = GlmForCausalLM(cfg.text).eval()
    glm.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))})
    ids = torch.randint(0, 250, (2, 11))
    assert torch.equal(model(ids).logits, glm(ids))


@torch.no_grad()
def test_cached_decoding_matches_full_forward_with_media(nano):
    """Prefill + token-by-token decoding equals recomputing the whole sequence, media included."""
    cfg = nano.config
    px, feats, samples = _media(cfg)
    prompt = torch.tensor([build_prompt(cfg, [40, 41, 42], cfg.audio.num_tokens(samples[0]))])
    result = greedy_generate(nano, prompt, 6, pixel_values=px, input_features=feats, audio_num_samples=samples,
                             stop_token_ids=(10**6 - 1,))
    generated = torch.tensor(result.tokens)
    assert generated.shape == (1, 6)
    full = nano(torch.cat([prompt, generated], 1), pixel_values=px, input_features=feats,
                audio_num_samples=samples).logits
    # Greedy: each generated token is the argmax of the full forward at the position before it (up to
    # rounding: cached decoding and the full forward are differently shaped computations).
    T = prompt.shape[1]
    near_tie = 1e-5 * full.abs().max().item()
    assert_greedy_agrees(generated, full[0, T - 1:-1].argmax(-1)[None], list(full[:, T - 1:-1].unbind(1)), near_tie)
    # And the logits themselves, step by step through the cache with the prompt's context.
    caches = nano.setup_caches(1, T + 6)
    out = nano(prompt, positions=torch.arange(T), caches=caches, pixel_values=px, input_features=feats,
               audio_num_samples=samples)
    steps = [out.logits]
    for i in range(5):
        steps.append(nano(generated[:, i:i + 1], positions=torch.tensor([T + i]), caches=caches,
                          context=out.context).logits)
    assert (torch.cat(steps, 1) - full[:, :-1]).abs().max() <= 1e-4
    assert set(result.timings) == {"vision", "audio", "prefill", "decode"}


@torch.no_grad()
def test_generation_stops_at_eos(nano):
    ids = torch.tensor([[1, 2, 3]])
    first = greedy_generate(nano, ids, 1).tokens[0][0]
    out = greedy_generate(nano, ids, 20, stop_token_ids=(first,))
    assert out.tokens == [[first]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(nano, ids, 0)
