"""Model configuration: one dataclass per part, presets, JSON round trip, validation.

Field names follow the Hugging Face configs of the parts (`GlmConfig`,
`CLIPVisionConfig`, `WhisperConfig`) so real checkpoints' configs map in by name.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
               f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _check_divides(obj: Any, heads: str, hidden: str) -> None:
    h, d = getattr(obj, heads), getattr(obj, hidden)
    _check(d % h == 0, f"{type(obj).__name__}.{heads}={h} must divide {hidden}={d}")


@dataclass
class TextConfig:
    """GLM-4 style decoder (HF `GlmForCausalLM`)."""
    vocab_size: int = 151552
    hidden_size: int = 3584
    intermediate_size: int = 26880
    num_hidden_layers: int = 24
    num_attention_heads: int = 28
    num_key_value_heads: int = 2
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-7
    attention_bias: bool = True
    max_position_embeddings: int = 32768
    # GLM-4.1V (the released AutoGLM-Phone-9B): multimodal RoPE and sandwich norms. mrope_section splits
    # the rotary_dim / 2 frequencies into runs driven by the temporal, height and width position rows.
    mrope_section: tuple[int, ...] | None = None
    # post_self_attn_layernorm / post_mlp_layernorm on each sublayer's output, before its residual add
    sandwich_norms: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim",
                        "max_position_embeddings")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"TextConfig.num_key_value_heads={self.num_key_value_heads} must divide "
               f"num_attention_heads={self.num_attention_heads}")
        _check(0 < self.partial_rotary_factor <= 1,
               f"TextConfig.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        _check(self.rotary_dim % 2 == 0 and self.rotary_dim == self.head_dim * self.partial_rotary_factor,
               f"TextConfig: head_dim * partial_rotary_factor = {self.head_dim * self.partial_rotary_factor} "
               "must be an even integer (rotary works on pairs)")
        _check(self.rope_theta > 0 and self.rms_norm_eps > 0, "TextConfig: rope_theta and rms_norm_eps must be > 0")
        if self.mrope_section is not None:
            self.mrope_section = tuple(self.mrope_section)
            _check(all(isinstance(n, int) and n > 0 for n in self.mrope_section)
                   and sum(self.mrope_section) == self.rotary_dim // 2,
                   f"TextConfig.mrope_section {self.mrope_section} must be positive ints summing to "
                   f"rotary_dim / 2 = {self.rotary_dim // 2}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def position_rows(self) -> int:
        """Rows of position ids per token: 3 (t, h, w) under M-RoPE, else 1."""
        return 1 if self.mrope_section is None else len(self.mrope_section)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def kv_cache_bytes_per_token(self, element_size: int) -> int:
        """K and V for every layer and KV head."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionModel`)."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Which encoder layer's output feeds the adapter: -1 = last hidden state (no post-LN), -2 = penultimate...
    feature_layer: int = -1
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        _check_positive(self, "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_channels", "image_size", "patch_size")
        _check_divides(self, "num_attention_heads", "hidden_size")
        _check(self.image_size % self.patch_size == 0,
               f"VisionConfig.patch_size={self.patch_size} must divide image_size={self.image_size}")
        _check(self.hidden_act in ("quick_gelu", "gelu"), f"VisionConfig.hidden_act {self.hidden_act!r} unsupported")
        # Index into [embeddings, layer 1 output, ..., layer L output], like HF `hidden_states`.
        _check(-self.num_hidden_layers - 1 <= self.feature_layer <= self.num_hidden_layers,
               f"VisionConfig.feature_layer={self.feature_layer} out of range for {self.num_hidden_layers} layers")
        _check(len(self.image_mean) == len(self.image_std) == self.num_channels,
               "VisionConfig.image_mean/image_std need one value per channel")

    @property
    def num_tokens(self) -> int:
        """CLS + one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class AudioConfig:
    """Whisper encoder (HF `WhisperEncoder`) and its log-mel front end."""
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    # Encoder frames (50 per second) are average-pooled by this factor before the adapter.
    pool_stride: int = 4

    def __post_init__(self) -> None:
        _check_positive(self, "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                        "encoder_ffn_dim", "max_source_positions", "sampling_rate", "n_fft",
                        "hop_length", "pool_stride")
        _check_divides(self, "encoder_attention_heads", "d_model")
        _check(self.d_model % 2 == 0 and self.d_model >= 4, "AudioConfig.d_model must be even and >= 4 (sinusoids)")

    @property
    def chunk_samples(self) -> int:
        """Samples in one padded window: 2 mel frames per encoder position (conv2 has stride 2)."""
        return self.max_source_positions * 2 * self.hop_length

    @property
    def samples_per_frame(self) -> int:
        return 2 * self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Encoder frames kept for a clip (50 per second at 16 kHz, rounded up, at most one window)."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        return min(math.ceil(num_samples / self.samples_per_frame), self.max_source_positions)

    def num_tokens(self, num_samples: int) -> int:
        """Adapted audio tokens for a clip: kept frames pooled by `pool_stride` (last window partial)."""
        return math.ceil(self.num_frames(num_samples) / self.pool_stride)


@dataclass
class AdapterConfig:
    """The article's DualPathAdapter, one per modality, and the Linear connector to the text width."""
    hidden_size: int = 512
    num_heads: int = 8
    ffn_multiplier: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_heads", "ffn_multiplier")
        _check_divides(self, "num_heads", "hidden_size")
        _check(0.0 <= self.dropout < 1.0, f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class FusionConfig:
    """Gated three-way fusion at the backbone input: z = g_v*v + g_a*a + g_t*t."""
    # Off: text tokens enter the backbone as plain embeddings (then the text path is exactly GlmForCausalLM).
    enabled: bool = True


@dataclass
class AutoGLMPhoneConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # Special tokens: the preset's own (the placeholder 151363 is not GLM-4.1V's <|image|> 151343; audio ids:
    # no public checkpoint). A checkpoint's tokenizer must agree with its config (see tokenizer.py).
    image_token_id: int = 151363
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    audio_token_id: int = 151365
    audio_start_token_id: int = 151343
    audio_end_token_id: int = 151344
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    pad_token_id: int = 151329

    _PARTS = {"text": TextConfig, "vision": VisionConfig, "audio": AudioConfig,
              "adapter": AdapterConfig, "fusion": FusionConfig}

    def __post_init__(self) -> None:
        for name, cls in self._PARTS.items():
            part = getattr(self, name)
            _check(isinstance(part, cls), f"AutoGLMPhoneConfig.{name} must be a {cls.__name__}, got {type(part).__name__}")
        self.eos_token_ids = tuple(self.eos_token_ids)
        _check(len(self.eos_token_ids) > 0, "AutoGLMPhoneConfig.eos_token_ids must not be empty")
        vocab = self.text.vocab_size
        for name in ("image_token_id", "image_start_token_id", "image_end_token_id", "audio_token_id",
                     "audio_start_token_id", "audio_end_token_id", "pad_token_id"):
            tok = getattr(self, name)
            _check(isinstance(tok, int) and 0 <= tok < vocab,
                   f"AutoGLMPhoneConfig.{name}={tok!r} is not a token id below vocab_size={vocab}")
        for tok in self.eos_token_ids:
            _check(isinstance(tok, int) and 0 <= tok < vocab, f"AutoGLMPhoneConfig.eos_token_ids: {tok!r} not in vocab")
        _check(self.image_token_id != self.audio_token_id, "image_token_id and audio_token_id must differ")

    def special_token_ids(self) -> dict[str, int]:
        """The special tokens whose ids this config fixes (a checkpoint's tokenizer must agree)."""
        return {"<|endoftext|>": self.eos_token_ids[0], "<|begin_of_image|>": self.image_start_token_id,
                "<|end_of_image|>": self.image_end_token_id, "<|image|>": self.image_token_id,
                "<|begin_of_audio|>": self.audio_start_token_id, "<|end_of_audio|>": self.audio_end_token_id,
                "<|audio|>": self.audio_token_id, "<|pad|>": self.pad_token_id}

    def placeholder_block(self, kind: str, num_tokens: int) -> list[int]:
        """`<|begin_of_X|> <|X|>×num_tokens <|end_of_X|>`: where a medium's adapted tokens are spliced."""
        if kind == "image":
            start, token, end = self.image_start_token_id, self.image_token_id, self.image_end_token_id
        elif kind == "audio":
            start, token, end = self.audio_start_token_id, self.audio_token_id, self.audio_end_token_id
        else:
            raise ValueError(f"kind must be 'image' or 'audio', got {kind!r}")
        return [start] + [token] * num_tokens + [end]

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "AutoGLMPhoneConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]()

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoGLMPhoneConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._PARTS:
                kwargs[key] = _part_from_dict(cls._PARTS[key], value, key)
            else:
                kwargs[key] = value
        _reject_unknown(cls, kwargs, "config")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "AutoGLMPhoneConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AutoGLMPhoneConfig":
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "AutoGLMPhoneConfig":
        return cls.load(Path(directory) / "config.json")


def _reject_unknown(cls: type, kwargs: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; expected a subset of {sorted(known)}")


def _part_from_dict(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise TypeError(f"config.{where} must be an object, got {type(value).__name__}")
    _reject_unknown(cls, value, f"config.{where}")
    return cls(**value)


def _autoglm_phone_9b() -> AutoGLMPhoneConfig:
    return AutoGLMPhoneConfig()  # the defaults are the SPEC §2 numbers


def _nano() -> AutoGLMPhoneConfig:
    """Every part and kind of layer, tiny and deliberately odd sizes so shape bugs show on CPU."""
    return AutoGLMPhoneConfig(
        text=TextConfig(vocab_size=300, hidden_size=72, intermediate_size=152, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                        max_position_embeddings=1024),
        vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=42, patch_size=14),
        audio=AudioConfig(d_model=40, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=80,
                          max_source_positions=100),
        adapter=AdapterConfig(hidden_size=56, num_heads=8),
        image_token_id=291, image_start_token_id=292, image_end_token_id=293,
        audio_token_id=294, audio_start_token_id=295, audio_end_token_id=296,
        eos_token_ids=(290,), pad_token_id=299,
    )


PRESETS = {"autoglm-phone-9b": _autoglm_phone_9b, "nano": _nano}
