import dataclasses

import pytest

from autoglm_fast import AdapterConfig, AudioConfig, AutoGLMPhoneConfig, TextConfig, VisionConfig


def test_9b_preset_has_every_spec_number():
    c = AutoGLMPhoneConfig.preset("autoglm-phone-9b")
    t = c.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.head_dim, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.rope_theta, t.rms_norm_eps) == \
        (24, 3584, 28, 128, 2, 26880, 151552, 10000.0, 1.5625e-7)
    assert t.rotary_dim == 64 and t.attention_bias
    v = c.vision
    assert (v.num_hidden_layers, v.hidden_size, v.num_attention_heads, v.intermediate_size, v.image_size,
            v.patch_size, v.hidden_act, v.num_tokens) == (24, 1024, 16, 4096, 224, 14, "quick_gelu", 257)
    a = c.audio
    assert (a.encoder_layers, a.d_model, a.encoder_attention_heads, a.encoder_ffn_dim, a.num_mel_bins,
            a.max_source_positions, a.sampling_rate, a.pool_stride) == (4, 384, 6, 1536, 80, 1500, 16000, 4)
    assert a.chunk_samples == 30 * 16000
    assert a.num_frames(16000) == 50 and a.num_frames(10**8) == 1500  # 50 frames/s, at most 30 s
    assert a.num_tokens(5 * 16000) == 63 and a.num_tokens(30 * 16000) == 375
    assert (c.adapter.hidden_size, c.adapter.num_heads, c.adapter.ffn_multiplier, c.adapter.dropout) == \
        (512, 8, 4, 0.1)
    assert c.fusion.enabled


def test_nano_preset_is_small_and_odd():
    c = AutoGLMPhoneConfig.preset("nano")
    assert c.text.hidden_size == 72 and c.text.num_hidden_layers == 3 and 250 <= c.text.vocab_size <= 320
    assert c.text.num_attention_heads != c.text.num_key_value_heads  # GQA is exercised
    assert c.vision.num_tokens == 10 and c.audio.chunk_samples == 2 * 16000


@pytest.mark.parametrize("preset", ["autoglm-phone-9b", "nano"])
def test_json_round_trip(preset, tmp_path):
    c = AutoGLMPhoneConfig.preset(preset)
    assert AutoGLMPhoneConfig.from_json(c.to_json()) == c
    c.save(tmp_path / "config.json")
    assert AutoGLMPhoneConfig.load(tmp_path / "config.json") == c


@pytest.mark.parametrize("make, match", [
    (lambda: VisionConfig(hidden_size=50, num_attention_heads=16), "num_attention_heads=16 must divide hidden_size"),
    (lambda: AudioConfig(d_model=100, encoder_attention_heads=6), "encoder_attention_heads=6 must divide d_model"),
    (lambda: AdapterConfig(hidden_size=500, num_heads=8), "num_heads=8 must divide hidden_size"),
    (lambda: TextConfig(num_attention_heads=28, num_key_value_heads=3), "num_key_value_heads=3 must divide"),
    (lambda: TextConfig(head_dim=10, partial_rotary_factor=0.5), "even integer"),
    (lambda: TextConfig(hidden_size=0), "hidden_size must be a positive int"),
    (lambda: VisionConfig(image_size=224, patch_size=15), "patch_size=15 must divide image_size"),
    (lambda: AdapterConfig(dropout=1.5), "dropout"),
    (lambda: AutoGLMPhoneConfig(image_token_id=10**6), "image_token_id"),
    (lambda: AutoGLMPhoneConfig.preset("glm-130b"), "unknown preset"),
])
def test_validation_errors_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_from_dict_rejects_unknown_and_malformed_keys():
    d = AutoGLMPhoneConfig.preset("nano").to_dict()
    with pytest.raises(ValueError, match="unknown config.text keys .*'hiden_size'"):
        AutoGLMPhoneConfig.from_dict({**d, "text": {**d["text"], "hiden_size": 8}})
    with pytest.raises(ValueError, match="unknown config keys"):
        AutoGLMPhoneConfig.from_dict({**d, "typo": 1})
    with pytest.raises(TypeError, match="config.vision must be an object"):
        AutoGLMPhoneConfig.from_dict({**d, "vision": 3})


def test_configs_are_plain_dataclasses():
    c = AutoGLMPhoneConfig.preset("nano")
    assert dataclasses.replace(c.text, num_hidden_layers=1).num_hidden_layers == 1
