"""Hugging Face checkpoints of the three standard parts (GLM, CLIP, Whisper) load into their parts by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from autoglm_fast.weights import CheckpointError, _check_materialized, detect_hf_part, load_hf_weights, materialize
from helpers import media_logits

TOL = 1e-4


def nano() -> AutoGLMPhoneConfig:
    return AutoGLMPhoneConfig.preset("nano")


def hf_glm(vocab_size: int = 300):
    cfg = transformers.GlmConfig(vocab_size=vocab_size, hidden_size=72, intermediate_size=152, num_hidden_layers=3,
                                 num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5},
                                 rms_norm_eps=1.5625e-7, pad_token_id=0, attn_implementation="eager")
    return jitter(transformers.GlmForCausalLM(cfg))


VISION_KW = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 image_size=42, patch_size=14)
WHISPER_KW = dict(d_model=40, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=80, num_mel_bins=80,
                  max_source_positions=100, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
                  vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  decoder_start_token_id=3, attn_implementation="eager")


@torch.no_grad()
def jitter(model):
    """Non-trivial norms and biases, so no parameter hides behind its init."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def built_nano() -> AutoGLMPhoneForCausalLM:
    return AutoGLMPhoneForCausalLM.from_config(nano(), seed=7)


@torch.no_grad()
def our_text_logits(model: AutoGLMPhoneForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None]
    return model.lm_head(model.model(model.model.embed_tokens(ids), positions))


def test_hf_glm_checkpoint(tmp_path):
    hf = hf_glm()
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(hf_save(hf, tmp_path)) == "glm"
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert set(hf_state) == {k for k in ours if k.startswith(("model.", "lm_head."))}
    for k, v in hf_state.items():
        assert torch.equal(ours[k], v), k
    for k, v in before.items():  # the other parts are untouched
        if not k.startswith(("model.", "lm_head.")):
            assert torch.equal(ours[k], v), k
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (our_text_logits(model, ids) - ref).abs().max() <= TOL


def test_hf_clip_vision_checkpoint(tmp_path):
    hf = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW,
                                                                           attn_implementation="eager")))
    path = hf_save(hf, tmp_path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        on_disk = set(f.keys())
    assert detect_hf_part(on_disk) == "clip"
    model = built_nano()
    assert model.load_hf_weights(path) == "clip"
    ours = model.state_dict()
    # transformers 5 writes CLIPVisionModel keys without `vision_model.` (4.x wrote it); either maps in.
    for k, v in hf.state_dict().items():
        k = k if k.startswith("vision_model.") else "vision_model." + k
        assert torch.equal(ours["vision_tower." + k], v), k
    assert len(hf.state_dict()) == sum(1 for k in ours if k.startswith("vision_tower."))
    px = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=px).last_hidden_state
        got = model.vision_tower(px)
    assert (got - ref).abs().max() <= TOL


def test_hf_clip_vision_checkpoint_with_prefixed_keys(tmp_path):
    """transformers 4.x layout: `vision_model.*` keys plus the `position_ids` buffer."""
    hf = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)))
    state = {"vision_model." + k: v.contiguous() for k, v in hf.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    model = built_nano()
    assert model.load_hf_weights(tmp_path) == "clip"
    for k, v in state.items():
        if not k.endswith("position_ids"):
            assert torch.equal(model.state_dict()["vision_tower." + k], v), k


def test_hf_clip_key_given_both_prefixed_and_unprefixed_is_an_error(tmp_path):
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["vision_model.post_layernorm.weight"] = state["post_layernorm.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"given twice \(1\):\n.*post_layernorm.weight"):
        built_nano().load_hf_weights(tmp_path)


def test_hf_full_clip_model_loads_vision_tower_only(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=VISION_KW, projection_dim=16)
    hf = jitter(transformers.CLIPModel(cfg))
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(hf_save(hf, tmp_path)) == "clip"
    ours = model.state_dict()
    for k, v in hf.vision_model.state_dict().items():
        assert torch.equal(ours["vision_tower.vision_model." + k], v), k
    for k, v in before.items():
        if not k.startswith("vision_tower."):
            assert torch.equal(ours[k], v), k
    px = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=px).last_hidden_state
    assert (model.vision_tower(px) - ref).abs().max() <= TOL


@pytest.mark.parametrize("cls", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_hf_whisper_checkpoint_ignores_the_decoder(tmp_path, cls):
    hf = jitter(getattr(transformers, cls)(transformers.WhisperConfig(**WHISPER_KW)))
    encoder = hf.get_encoder()
    path = hf_save(hf, tmp_path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert any("decoder." in k for k in f.keys())  # the decoder is there, and must be skipped
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(path) == "whisper"
    ours = model.state_dict()
    enc_state = encoder.state_dict()
    assert set("audio_tower." + k for k in enc_state) == {k for k in ours if k.startswith("audio_tower.")}
    for k, v in enc_state.items():
        assert torch.equal(ours["audio_tower." + k], v), k
    for k, v in before.items():
        if not k.startswith("audio_tower."):
            assert torch.equal(ours[k], v), k
    feats = torch.randn(2, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = encoder(feats).last_hidden_state
        got = model.audio_tower(feats)
    assert (got - ref).abs().max() <= TOL


def test_bare_whisper_encoder_checkpoint(tmp_path):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    enc = jitter(WhisperEncoder(transformers.WhisperConfig(**WHISPER_KW)))
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = built_nano()
    assert model.load_hf_weights(tmp_path) == "whisper"
    for k, v in enc.state_dict().items():
        assert torch.equal(model.state_dict()["audio_tower." + k], v), k


def test_hf_glm_wrong_vocab_is_a_shape_error(tmp_path):
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"wrong shape \(2\)") as info:
        model.load_hf_weights(hf_save(hf_glm(vocab_size=320), tmp_path))
    msg = str(info.value)
    assert "(as glm)" in msg
    assert "model.embed_tokens.weight: checkpoint (320, 72) vs model (300, 72)" in msg
    assert "lm_head.weight: checkpoint (320, 72) vs model (300, 72)" in msg
    assert "missing" not in msg and "unexpected" not in msg
    for k, v in model.state_dict().items():  # checked before anything is written
        assert torch.equal(v, before[k]), k


def test_hf_checkpoint_errors(tmp_path):
    model = built_nano()
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cannot tell which part"):
        model.load_hf_weights(tmp_path)
    with pytest.raises(ValueError, match="part must be one of"):
        model.load_hf_weights(tmp_path, part="t5")
    with pytest.raises(CheckpointError, match=r"(?s)missing \(\d+\).*unexpected \(1\):\s+foo\.weight"):
        model.load_hf_weights(tmp_path, part="clip")  # unprefixed key -> vision_tower.vision_model.foo.weight
    with pytest.raises(CheckpointError, match="no such file or directory"):
        model.load_hf_weights(tmp_path / "absent")


def test_hf_parts_into_a_meta_model_with_dtype_and_device(tmp_path):
    hf = hf_glm()
    clip = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)))
    hf_save(hf, tmp_path / "glm")
    hf_save(clip, tmp_path / "clip")
    with torch.device("meta"):
        model = AutoGLMPhoneForCausalLM(nano())
    assert load_hf_weights(model, tmp_path / "glm", dtype=torch.float16, device="cpu") == "glm"
    assert load_hf_weights(model, tmp_path / "clip", "clip", dtype=torch.float16, device="cpu") == "clip"
    ours = model.state_dict()
    for k, v in hf.state_dict().items():
        if "rotary_emb" not in k:
            assert ours[k].device.type == "cpu" and ours[k].dtype == torch.float16, k
            assert torch.equal(ours[k], v.half()), k
    for k, v in clip.state_dict().items():
        assert torch.equal(ours["vision_tower.vision_model." + k], v.half()), k
    assert all(t.is_meta for k, t in ours.items() if k.startswith(("audio_tower.", "fusion.", "vision_adapter.")))
    with pytest.raises(CheckpointError, match="left without data"):
        _check_materialized(model)

    materialize(model, dtype=torch.float16, device="cpu", seed=0)  # the rest: seeded random init
    filled = model.state_dict()
    assert not any(t.is_meta for t in filled.values())
    assert all(t.dtype == torch.float16 for t in filled.values())
    for k, v in hf.state_dict().items():  # loaded parameters untouched by materialize
        if "rotary_emb" not in k:
            assert torch.equal(filled[k], v.half()), k
    logits = media_logits(model.eval())
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
