"""The fast backbone on the paged KV cache driven through the same tokens as the eager reference:
prefill, 32 greedy decode steps, chunked prefill, ragged batches."""
import pytest
import torch

import autoglm_fast
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.fast import FastGlmAttention, FastGlmDecoderLayer, FastGlmMLP, FastRMSNorm
from autoglm_fast.paged_cache import PagedKVCache
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from agreement import assert_greedy_agrees
from helpers import AUDIO_SAMPLES, media_inputs
from kernel_harness import DEVICE, requires_kernels

pytestmark = requires_kernels
STEPS = 32


def _pair(dtype, scale=3.0):
    """The eager reference and a fast copy with identical weights."""
    models = []
    for _ in range(2):
        m = AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano"), seed=0, device=DEVICE)
        with torch.no_grad():  # larger than the 0.02 init so the tokens depend on every layer
            for p in m.parameters():
                p.mul_(scale)
        models.append(m.to(dtype))
    return models[0], models[1], autoglm_fast.apply_fast_kernels(models[1])


def _tol(dtype):
    return {torch.float32: 2e-4, torch.float16: 2e-2}[dtype]


@torch.no_grad()
def _reference_run(model, embeds, ctx, steps):
    T = embeds.shape[1]
    caches = model.setup_caches(1, T + steps)
    logits = [model(inputs_embeds=embeds, positions=torch.arange(T, device=DEVICE), caches=caches,
                    context=ctx).logits[:, -1]]
    tokens = []
    for i in range(steps):
        tokens.append(logits[-1].argmax(-1))
        logits.append(model(tokens[-1][:, None], positions=torch.tensor([T + i], device=DEVICE), caches=caches,
                            context=ctx).logits[:, -1])
    return torch.stack(tokens, 1), logits


@torch.no_grad()
def _fast_run(model, embeds, ctx, steps, chunks=(None,), block_size=16, forced=None):
    """Greedy tokens and logits; fed the `forced` tokens instead of its own where given (the same inputs as
    another run, so that a near tie broken the other way does not change every later step)."""
    T = embeds.shape[1]
    cache = PagedKVCache(model.config.text, num_blocks=64, block_size=block_size, dtype=embeds.dtype, device=DEVICE)
    bounds = [0] + [c for c in chunks if c is not None] + [T]
    for lo, hi in zip(bounds, bounds[1:]):  # the prompt in pieces: each attends to the cached prefix
        meta = cache.step(["req"], [hi - lo])
        out = model(inputs_embeds=embeds[:, lo:hi], positions=meta.positions[None], caches=cache.layer_caches(meta),
                    context=ctx).logits[:, -1]
    logits, tokens = [out], []
    for i in range(steps):
        tokens.append(logits[-1].argmax(-1))
        meta = cache.step(["req"], [1])
        fed = tokens[-1] if forced is None else forced[:, i]
        logits.append(model(fed[:, None], positions=meta.positions[None], caches=cache.layer_caches(meta),
                            context=ctx).logits[:, -1])
    return torch.stack(tokens, 1), logits


def _prompt(model, dtype):
    ids, px, feats = media_inputs(model.config)
    with torch.no_grad():
        images = model.encode_images(px.to(DEVICE, dtype))
        audio = model.encode_audio(feats.to(DEVICE, dtype), [AUDIO_SAMPLES])
        return model.embed(ids.to(DEVICE), images, audio)


def test_swap_report_lists_the_backbone():
    _, fast, report = _pair(torch.float32)
    layers = fast.config.text.num_hidden_layers
    for i in range(layers):
        for name in ("", ".self_attn", ".mlp", ".input_layernorm", ".post_attention_layernorm"):
            assert f"model.layers.{i}{name}" in report.swapped
    assert "model.norm" in report.swapped and not report.skipped
    layer = fast.model.layers[0]
    assert isinstance(layer, FastGlmDecoderLayer) and isinstance(layer.self_attn, FastGlmAttention)
    assert isinstance(layer.mlp, FastGlmMLP) and isinstance(fast.model.norm, FastRMSNorm)


def test_state_dict_unchanged_and_qkv_not_held_twice():
    ref, fast, _ = _pair(torch.float32)
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert sd_ref.keys() == sd_fast.keys()
    assert all(torch.equal(sd_ref[k], sd_fast[k]) for k in sd_ref)
    attn = fast.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_then_32_greedy_steps_match_the_reference(dtype):
    ref, fast, _ = _pair(dtype)
    embeds, ctx = _prompt(ref, dtype)
    ref_tokens, ref_logits = _reference_run(ref, embeds, ctx, STEPS)
    tokens, logits = _fast_run(fast, embeds, ctx, STEPS, forced=ref_tokens)
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= _tol(dtype) * max(1.0, b.float().abs().max().item()), f"step {step}: {err}"
    scale = max(1.0, max(b.float().abs().max().item() for b in ref_logits))
    assert_greedy_agrees(tokens, ref_tokens, ref_logits, 2 * _tol(dtype) * scale)  # ties within the error


@pytest.mark.parametrize("block_size", [16, 32])
def test_chunked_prefill_equals_one_piece(block_size):
    _, fast, _ = _pair(torch.float32)
    embeds, ctx = _prompt(fast, torch.float32)
    T = embeds.shape[1]
    whole_tokens, whole = _fast_run(fast, embeds, ctx, 4, block_size=block_size)
    tokens, pieces = _fast_run(fast, embeds, ctx, 4, chunks=(T // 3, 2 * T // 3), block_size=block_size,
                               forced=whole_tokens)
    for a, b in zip(pieces, whole):
        assert (a - b).abs().max() <= 2e-4 * max(1.0, b.abs().max().item())
    assert_greedy_agrees(tokens, whole_tokens, whole, 4e-4 * max(1.0, max(b.abs().max().item() for b in whole)))


@torch.no_grad()
def test_ragged_batch_prefill_and_decode_match_each_sequence_alone():
    """Three prompts of different lengths packed into one prefill step, then decoded together."""
    _, fast, _ = _pair(torch.float32)
    torch.manual_seed(0)
    prompts = [torch.randint(0, 256, (1, n), device=DEVICE) for n in (5, 17, 1)]
    alone = []
    for p in prompts:
        cache = PagedKVCache(fast.config.text, 32, 16, torch.float32, DEVICE)
        meta = cache.step([0], [p.shape[1]])
        first = fast(p, positions=meta.positions[None], caches=cache.layer_caches(meta)).logits[0, -1]
        tok = first.argmax()[None, None]
        meta = cache.step([0], [1])
        alone.append((first, fast(tok, positions=meta.positions[None], caches=cache.layer_caches(meta)).logits[0, -1]))
    cache = PagedKVCache(fast.config.text, 32, 16, torch.float32, DEVICE)
    meta = cache.step([0, 1, 2], [p.shape[1] for p in prompts])
    packed = torch.cat(prompts, 1)  # [1, 23]: sequences back to back, as an engine packs them
    out = fast(packed, positions=meta.positions[None], caches=cache.layer_caches(meta)).logits[0]
    last = meta.query_start_loc[1:].long() - 1
    toks = out[last].argmax(-1)
    meta = cache.step([0, 1, 2], [1, 1, 1])
    step = fast(toks[:, None], positions=meta.positions[:, None], caches=cache.layer_caches(meta)).logits[:, -1]
    for i, (first, second) in enumerate(alone):
        assert (out[last[i]] - first).abs().max() <= 2e-4 * max(1.0, first.abs().max().item())
        assert (step[i] - second).abs().max() <= 2e-4 * max(1.0, second.abs().max().item())


def test_reference_attention_rejects_a_paged_cache():
    ref, _, _ = _pair(torch.float32)
    cache = PagedKVCache(ref.config.text, 8, 16, torch.float32, DEVICE)
    meta = cache.step(["x"], [3])
    with pytest.raises(TypeError, match="needs the fast attention"):
        ref(torch.zeros(1, 3, dtype=torch.long, device=DEVICE), positions=meta.positions[None],
            caches=cache.layer_caches(meta))
