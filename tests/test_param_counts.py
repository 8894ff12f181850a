"""Parameter counts of the full preset, built on the meta device (no memory), per part and vs transformers."""
import torch
import transformers

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM


def _meta_model():
    with torch.device("meta"):
        return AutoGLMPhoneForCausalLM(AutoGLMPhoneConfig.preset("autoglm-phone-9b"))


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_9b_parameter_counts_per_part():
    counts = _meta_model().parameter_counts()
    assert counts == {
        "backbone": 8_683_531_776,   # SPEC: 8.68 B
        "vision": 303_179_776,       # SPEC: 303 M (CLIP ViT-L/14 vision tower)
        "audio": 8_208_384,          # SPEC: 8.2 M (Whisper-Tiny encoder)
        "adapters": 10_701_824,      # two DualPathAdapters + two 512->3584 connectors
        "fusion": 32_259,            # W_g 3 x (3*3584) + 3
        "total": 9_005_654_019,      # SPEC: ~9.0 B
    }
    assert abs(counts["adapters"] + counts["fusion"] - 10.7e6) < 0.05e6  # SPEC: "adapters and gate 10.7 M"
    assert abs(counts["total"] - 9.0e9) < 0.01e9


def test_backbone_vision_audio_counts_match_transformers():
    cfg = AutoGLMPhoneConfig.preset("autoglm-phone-9b")
    t, v, a = cfg.text, cfg.vision, cfg.audio
    ours = _meta_model().parameter_counts()
    with torch.device("meta"):
        glm = transformers.GlmForCausalLM(transformers.GlmConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, attention_bias=True,
            tie_word_embeddings=False))
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size))
        whisper = transformers.models.whisper.modeling_whisper.WhisperEncoder(transformers.WhisperConfig(
            d_model=a.d_model, encoder_layers=a.encoder_layers, encoder_attention_heads=a.encoder_attention_heads,
            encoder_ffn_dim=a.encoder_ffn_dim, num_mel_bins=a.num_mel_bins,
            max_source_positions=a.max_source_positions))
    assert ours["backbone"] == _numel(glm)
    assert ours["vision"] == _numel(clip)
    assert ours["audio"] == _numel(whisper)


def test_kv_cache_costs_24_kib_per_token_in_fp16():
    assert AutoGLMPhoneConfig.preset("autoglm-phone-9b").text.kv_cache_bytes_per_token(2) == 24 * 1024
