"""Parity of the eager reference encoders with transformers' CLIPVisionModel and WhisperEncoder."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, WhisperConfig
from transformers import CLIPVisionModel as HFCLIPVisionModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder
from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids

from autoglm_fast.config import AudioConfig, VisionConfig
from autoglm_fast.reference.clip import CLIPVisionModel
from autoglm_fast.reference.whisper import WhisperEncoder, sinusoids

TOL = 1e-4

VISION = {
    "nano": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 image_size=42, patch_size=14),
    # odd: 1 channel, exact gelu, 3 heads of 12, 5x5 grid, non-default eps
    "odd": dict(hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=3,
                num_channels=1, image_size=30, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6,
                image_mean=(0.5,), image_std=(0.25,)),
}
AUDIO = {
    "nano": dict(d_model=40, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=80,
                 max_source_positions=100),
    "odd": dict(num_mel_bins=13, d_model=36, encoder_layers=3, encoder_attention_heads=3, encoder_ffn_dim=52,
                max_source_positions=37),
}
HF_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "layer_norm_eps", "hidden_act")
HF_AUDIO_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "max_source_positions")


def hf_clip(cfg: VisionConfig) -> HFCLIPVisionModel:
    return HFCLIPVisionModel(CLIPVisionConfig(**{k: getattr(cfg, k) for k in HF_VISION_KEYS},
                                              attn_implementation="eager"))


def hf_whisper(cfg: AudioConfig) -> HFWhisperEncoder:
    return HFWhisperEncoder(WhisperConfig(**{k: getattr(cfg, k) for k in HF_AUDIO_KEYS}, attn_implementation="eager"))


def clip_state_dict(hf: HFCLIPVisionModel) -> dict[str, torch.Tensor]:
    # transformers 5 strips the checkpoints' `vision_model.` prefix on load; ours keeps it (checkpoint names).
    return {f"vision_model.{k}": v for k, v in hf.state_dict().items()}


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Jitter every weight (LayerNorm scales and biases included) so no parameter's role is hidden by its init."""
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))


def paired_clip(name: str, feature_layer: int) -> tuple[HFCLIPVisionModel, CLIPVisionModel, VisionConfig]:
    torch.manual_seed(0)
    cfg = VisionConfig(**VISION[name], feature_layer=feature_layer)
    hf = hf_clip(cfg).eval()
    randomize(hf)
    ours = CLIPVisionModel(cfg).eval()
    assert set(ours.state_dict()) == set(clip_state_dict(hf))
    ours.load_state_dict(clip_state_dict(hf), strict=True)
    return hf, ours, cfg


def paired_whisper(name: str) -> tuple[HFWhisperEncoder, WhisperEncoder, AudioConfig]:
    torch.manual_seed(0)
    cfg = AudioConfig(**AUDIO[name])
    hf = hf_whisper(cfg).eval()
    randomize(hf)
    ours = WhisperEncoder(cfg).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours, cfg


@pytest.mark.parametrize("name", sorted(VISION))
@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_clip_parity(name: str, feature_layer: int, batch: int) -> None:
    hf, ours, cfg = paired_clip(name, feature_layer)
    torch.manual_seed(1)
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size)
    ref = hf(pixel_values=pixels, output_hidden_states=True)
    got = ours(pixels)
    assert got.shape == (batch, cfg.num_tokens, cfg.hidden_size)
    assert (got - ref.hidden_states[feature_layer]).abs().max().item() <= TOL
    if feature_layer == -1:
        assert (got - ref.last_hidden_state).abs().max().item() <= TOL


def test_clip_skips_unused_layers() -> None:
    _, ours, cfg = paired_clip("odd", -2)
    calls: list[int] = []
    for i, layer in enumerate(ours.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        ours(torch.randn(1, cfg.num_channels, cfg.image_size, cfg.image_size))
    assert calls == list(range(cfg.num_hidden_layers - 1))


@pytest.mark.parametrize("name", sorted(AUDIO))
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_whisper_parity(name: str, batch: int) -> None:
    hf, ours, cfg = paired_whisper(name)
    torch.manual_seed(1)
    mels = torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions)
    ref = hf(input_features=mels).last_hidden_state
    got = ours(mels)
    assert got.shape == (batch, cfg.max_source_positions, cfg.d_model)
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(AUDIO))
def test_whisper_positions_match_hf_init(name: str) -> None:
    cfg = AudioConfig(**AUDIO[name])
    ours = WhisperEncoder(cfg)
    hf_weight = hf_whisper(cfg).embed_positions.weight
    assert torch.equal(ours.embed_positions.weight, hf_weight)
    assert torch.equal(sinusoids(cfg.max_source_positions, cfg.d_model),
                       hf_sinusoids(cfg.max_source_positions, cfg.d_model))
    assert not ours.embed_positions.weight.requires_grad


def test_clip_input_errors() -> None:
    cfg = VisionConfig(**VISION["nano"])
    model = CLIPVisionModel(cfg)
    s = cfg.image_size
    bad = [
        (torch.randn(3, s, s), ValueError),                    # no batch dim
        (torch.randn(1, 4, s, s), ValueError),                 # channels
        (torch.randn(1, 3, s + 14, s + 14), ValueError),       # image size
        (torch.randn(1, 3, s, s - 14), ValueError),            # non-square
        (torch.zeros(1, 3, s, s, dtype=torch.uint8), TypeError),
        (torch.zeros(1, 3, s, s).numpy(), TypeError),
    ]
    for x, err in bad:
        with pytest.raises(err, match="pixel_values"):
            model(x)


def test_whisper_input_errors() -> None:
    cfg = AudioConfig(**AUDIO["nano"])
    model = WhisperEncoder(cfg)
    m, t = cfg.num_mel_bins, 2 * cfg.max_source_positions
    bad = [
        (torch.randn(m, t), ValueError),                       # no batch dim
        (torch.randn(1, m + 1, t), ValueError),                # mel count
        (torch.randn(1, m, t - 2), ValueError),                # unpadded clip
        (torch.randn(1, m, t + 2), ValueError),                # too long
        (torch.zeros(1, m, t, dtype=torch.int64), TypeError),
        ([[0.0]], TypeError),
    ]
    for x, err in bad:
        with pytest.raises(err, match="input_features"):
            model(x)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_meta_construction_and_real_size_param_counts() -> None:
    vcfg, acfg = VisionConfig(), AudioConfig()  # ViT-L/14 224, whisper-tiny encoder
    with torch.device("meta"):
        clip, hf_c = CLIPVisionModel(vcfg), hf_clip(vcfg)
        whisper, hf_w = WhisperEncoder(acfg), hf_whisper(acfg)
    assert all(p.is_meta for p in clip.parameters()) and all(p.is_meta for p in whisper.parameters())
    assert set(clip.state_dict()) == set(clip_state_dict(hf_c))
    assert set(whisper.state_dict()) == set(hf_w.state_dict())
    assert num_params(clip) == num_params(hf_c) == 303_179_776
    assert num_params(whisper) == num_params(hf_w)
