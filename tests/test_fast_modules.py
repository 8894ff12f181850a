"""Fast modules are drop-in: same state dict, shared weights, same outputs; apply_fast_kernels swaps
them into a model in place and reports it; unsupported cases fall back with one clear warning."""
import warnings

import pytest
import torch

import autoglm_fast
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.fast import FastDualPathAdapter, FastGatedFusion
from autoglm_fast.fast.base import FastModule
from autoglm_fast.reference.adapter import DualPathAdapter
from autoglm_fast.reference.fusion import GatedFusion
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from helpers import AUDIO_SAMPLES, media_inputs
from kernel_harness import DEVICE, assert_matches, randn, requires_kernels

pytestmark = requires_kernels


@pytest.fixture(autouse=True)
def _fresh_warnings():
    FastModule._warned.clear()  # each test sees its own first warning


def _adapter(input_dim, hidden, dtype):
    torch.manual_seed(0)
    ref = DualPathAdapter(input_dim, hidden).to(DEVICE).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("input_dim, hidden, L", [(30, 56, 1), (48, 56, 17), (40, 64, 33)])
def test_fast_adapter_equals_reference(dtype, input_dim, hidden, L):
    ref = _adapter(input_dim, hidden, dtype)
    fast = FastDualPathAdapter.from_reference(ref)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    assert all(a is b for a, b in zip(fast.parameters(), ref.parameters()))  # shared, not copied
    x = randn(2, L, input_dim, dtype=dtype)
    with torch.no_grad():
        assert_matches(fast(x), ref, x)


def test_fast_adapter_padding_never_changes_real_rows():
    ref = _adapter(24, 56, torch.float32)
    fast = FastDualPathAdapter.from_reference(ref)
    lengths = [9, 4]
    x = randn(2, 9, 24, scale=1.0)
    x[1, 4:] = 1e3
    mask = torch.arange(9, device=DEVICE)[None] >= torch.tensor(lengths, device=DEVICE)[:, None]
    with torch.no_grad():
        got = fast(x, key_padding_mask=mask)
        assert_matches(got[1:, :4], ref, x[1:, :4])  # the clip alone
        assert_matches(got, ref, x, key_padding_mask=mask)


@pytest.mark.parametrize("kind", ["clip", "whisper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, t", [(1, 1), (2, 16), (2, 33)])
def test_fast_encoder_attention_is_one_qkv_gemm_and_equals_reference(kind, dtype, n, t):
    from autoglm_fast.config import VisionConfig
    from autoglm_fast.fast.encoders import FastCLIPAttention, FastWhisperAttention
    from autoglm_fast.reference.clip import CLIPAttention
    from autoglm_fast.reference.whisper import WhisperAttention
    torch.manual_seed(1)
    ref = (CLIPAttention(VisionConfig(hidden_size=64, num_attention_heads=4)) if kind == "clip"
           else WhisperAttention(64, 4)).to(DEVICE, dtype).eval()
    keys = ref.state_dict().keys()
    fast = (FastCLIPAttention if kind == "clip" else FastWhisperAttention).from_reference(ref)
    assert fast.state_dict().keys() == keys and fast.qkv_weight.shape == (3 * 64, 64)
    assert fast.k_proj.weight.data_ptr() == fast.qkv_weight[64:].data_ptr()  # views: no weight held twice
    assert (fast.k_proj.bias is None) == (kind == "whisper") and fast.qkv_bias[64:128].abs().sum() == (
        0 if kind == "whisper" else fast.k_proj.bias.abs().sum())
    x = randn(n, t, 64, dtype=dtype, scale=1.0)
    with torch.no_grad():
        assert_matches(fast(x), ref, x)


def test_fast_fusion_equals_reference():
    ref = GatedFusion(72).to(DEVICE)
    fast = FastGatedFusion.from_reference(ref)
    t, v, a = randn(3, 5, 72), randn(3, 72), randn(3, 72)
    has_v = torch.tensor([True, False, True], device=DEVICE)
    with torch.no_grad():
        assert_matches(fast(t, v, a, has_v=has_v), ref, t, v, a, has_v=has_v)
        assert_matches(fast(t[:, :1]), ref, t[:, :1])


def test_from_reference_checks_the_type():
    with pytest.raises(TypeError, match="needs a GatedFusion"):
        FastGatedFusion.from_reference(DualPathAdapter(8, 16))


def test_training_or_grad_mode_falls_back_with_one_warning():
    ref = _adapter(24, 56, torch.float32)
    fast = FastDualPathAdapter.from_reference(ref).train()
    x = randn(1, 5, 24)
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="training mode applies dropout"):
        y = fast(x)
    torch.manual_seed(1)
    assert torch.equal(y, DualPathAdapter.forward(fast, x))  # the reference path, dropout and all
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns only once
        fast(x)
    fast.eval()
    with pytest.warns(RuntimeWarning, match="gradients are needed"):
        y = fast(x)
    y.sum().backward()  # autograd works through the reference path
    assert fast.proj.weight.grad is not None


def _nano(dtype, scale=3.0):
    model = AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano"), seed=0, device=DEVICE)
    with torch.no_grad():  # larger than the 0.02 init, so every part visibly shapes the logits
        for p in model.parameters():
            p.mul_(scale)
    return model.to(dtype)


@torch.no_grad()
def _logits(model, dtype):
    ids, px, feats = media_inputs(model.config)
    return model(ids.to(DEVICE), pixel_values=px.to(DEVICE, dtype), input_features=feats.to(DEVICE, dtype),
                 audio_num_samples=[AUDIO_SAMPLES]).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_fast_kernels_on_nano_keeps_the_logits(dtype):
    exact = _logits(_nano(torch.float32), torch.float32)
    model = _nano(dtype)
    ref = _logits(model, dtype)
    report = autoglm_fast.apply_fast_kernels(model)
    assert {"vision_adapter", "audio_adapter", "fusion"} <= set(report.swapped) and not report.skipped
    assert "vision_tower.vision_model.encoder.layers.0.self_attn" in report.swapped  # CLIP: one qkv GEMM
    assert "audio_tower.layers.0.self_attn" in report.swapped  # Whisper too
    assert isinstance(model.vision_adapter, FastDualPathAdapter) and isinstance(model.fusion, FastGatedFusion)
    got = _logits(model, dtype)
    if dtype == torch.float32:
        assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    else:  # fp16: the fast path must be no further from the fp32 result than the fp16 reference is
        assert (got - exact).abs().max() <= 1.5 * (ref - exact).abs().max() + 1e-3
    assert "vision_adapter: DualPathAdapter -> FastDualPathAdapter" in str(report)


def test_unsupported_device_keeps_the_reference_with_a_warning(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU-only check: CPU tensors without the interpreter are unsupported")
    model = _nano(torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="kept the eager reference for .* module"):
        report = autoglm_fast.apply_fast_kernels(model)
    assert not report.swapped and {"vision_adapter", "audio_adapter", "fusion"} <= set(report.skipped)
    assert type(model.fusion) is GatedFusion
