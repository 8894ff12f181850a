"""GLM-4.1V (`Glm4vForConditionalGeneration`, model_type "glm4v"): the released AutoGLM-Phone-9B.

The decoder is our GLM `TextConfig` with M-RoPE and sandwich norms switched on; the vision tower has
its own config. `Glm4vConfig.from_hf` reads a checkpoint's `config.json` as transformers writes it,
old (4.5x: text fields at the top level, `rope_scaling`) and new (5.x: `text_config`,
`rope_parameters`) alike, and `generation_config.json`'s eos list when there is one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import TextConfig, _check, _check_divides, _check_positive

ARCHITECTURES = ("Glm4vForConditionalGeneration",)
MODEL_TYPES = ("glm4v",)


@dataclass
class Glm4vVisionConfig:
    """HF `Glm4vVisionConfig`: a ViT with 2D RoPE; blocks' SwiGLU is `out_hidden_size` wide, the
    merger's `intermediate_size` wide."""
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    in_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        _check_positive(self, "depth", "hidden_size", "num_heads", "in_channels", "image_size", "patch_size",
                        "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "intermediate_size")
        _check_divides(self, "num_heads", "hidden_size")
        _check(self.head_dim % 4 == 0, f"Glm4vVisionConfig: head_dim {self.head_dim} must be a multiple of 4 "
                                       "(2D RoPE: half the pairs for rows, half for columns)")
        _check(self.image_size % self.patch_size == 0,
               f"Glm4vVisionConfig.patch_size={self.patch_size} must divide image_size={self.image_size}")
        _check(self.hidden_act == "silu", f"Glm4vVisionConfig.hidden_act {self.hidden_act!r} unsupported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal x patch x patch (1176 for the real one)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclass
class Glm4vConfig:
    text: TextConfig = field(default_factory=lambda: TextConfig(
        hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5, mrope_section=(8, 12, 12), sandwich_norms=True))
    vision: Glm4vVisionConfig = field(default_factory=Glm4vVisionConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    pad_token_id: int | None = 151329
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.text, TextConfig), "Glm4vConfig.text must be a TextConfig")
        _check(isinstance(self.vision, Glm4vVisionConfig), "Glm4vConfig.vision must be a Glm4vVisionConfig")
        _check(self.text.mrope_section is not None and len(self.text.mrope_section) == 3,
               "Glm4vConfig.text needs a 3-part mrope_section (temporal, height, width)")
        self.eos_token_ids = tuple(self.eos_token_ids)
        vocab = self.text.vocab_size
        for name in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                     "video_start_token_id", "video_end_token_id"):
            tok = getattr(self, name)
            _check(isinstance(tok, int) and 0 <= tok < vocab,
                   f"Glm4vConfig.{name}={tok!r} is not a token id below vocab_size={vocab}")
        _check(len(self.eos_token_ids) > 0 and all(0 <= t < vocab for t in self.eos_token_ids),
               f"Glm4vConfig.eos_token_ids {self.eos_token_ids} must be token ids below vocab_size={vocab}")

    def special_token_ids(self) -> dict[str, int]:
        """The special tokens whose ids this config fixes (a checkpoint's tokenizer must agree)."""
        return {"<|endoftext|>": self.eos_token_ids[0], "<|begin_of_image|>": self.image_start_token_id,
                "<|end_of_image|>": self.image_end_token_id, "<|image|>": self.image_token_id}

    @property
    def merge_unit(self) -> int:
        """Vision patches per LLM token (spatial_merge_size squared)."""
        return self.vision.spatial_merge_size ** 2

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Glm4vConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown glm4v preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]()

    # ---- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, data: dict[str, Any], generation: dict[str, Any] | None = None) -> "Glm4vConfig":
        """From a transformers `Glm4vConfig` dict (config.json), and generation_config.json's dict."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        text = {**{k: v for k, v in data.items() if k not in ("text_config", "vision_config")},
                **(data.get("text_config") or {})}
        rope = dict(text.get("rope_scaling") or {})
        rope.update(text.get("rope_parameters") or {})
        heads = int(text.get("num_attention_heads", 32))
        hidden = int(text.get("hidden_size", 4096))
        text_cfg = TextConfig(
            vocab_size=int(text.get("vocab_size", 151552)), hidden_size=hidden,
            intermediate_size=int(text.get("intermediate_size", 13696)),
            num_hidden_layers=int(text.get("num_hidden_layers", 40)), num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            # GLM-4.1V's configs name 0.5; transformers' class default (1.0) cannot run the default
            # mrope_section (32 frequencies of 64), so an unnamed factor means the model's own 0.5.
            partial_rotary_factor=float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.5))),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)), attention_bias=True,
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            mrope_section=tuple(rope.get("mrope_section", (8, 12, 12))), sandwich_norms=True)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _check(rope_type in ("default", "mrope"), f"config.json: rope type {rope_type!r} is not supported "
                                                  "(GLM-4.1V uses plain M-RoPE)")
        v = data.get("vision_config") or {}
        v_rope = v.get("rope_parameters") or {}
        vision = Glm4vVisionConfig(
            **{f.name: v[f.name] for f in dataclasses.fields(Glm4vVisionConfig) if f.name in v},
        )
        if "rope_theta" in v_rope:
            vision.rope_theta = float(v_rope["rope_theta"])
        ids = {k: int(data[k]) for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                          "image_end_token_id", "video_start_token_id", "video_end_token_id")
               if data.get(k) is not None}
        eos = (generation or {}).get("eos_token_id", text.get("eos_token_id"))
        if eos is not None:
            ids["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        pad = (generation or {}).get("pad_token_id", text.get("pad_token_id"))
        if pad is not None:
            ids["pad_token_id"] = int(pad)
        tie = bool(data.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        return cls(text=text_cfg, vision=vision, tie_word_embeddings=tie, **ids)

    @classmethod
    def load(cls, directory: str | Path) -> "Glm4vConfig":
        directory = Path(directory)
        data = json.loads((directory / "config.json").read_text())
        gen_path = directory / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        return cls.from_hf(data, generation)

    from_checkpoint = load

    def to_hf(self) -> dict[str, Any]:
        """config.json in transformers 5's layout (`text_config` with `rope_parameters`)."""
        t = self.text
        text = {"model_type": "glm4v_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
                "hidden_act": "silu", "attention_bias": True, "eos_token_id": list(self.eos_token_ids),
                "pad_token_id": self.pad_token_id,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "partial_rotary_factor": t.partial_rotary_factor,
                                    "mrope_section": list(t.mrope_section)}}
        vision = {"model_type": "glm4v_vision", **dataclasses.asdict(self.vision)}
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
        return {"architectures": list(ARCHITECTURES), "model_type": "glm4v", "text_config": text,
                "vision_config": vision, "tie_word_embeddings": self.tie_word_embeddings,
                **{k: getattr(self, k) for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                                 "image_end_token_id", "video_start_token_id", "video_end_token_id")}}


def _glm41v_9b() -> Glm4vConfig:
    return Glm4vConfig()  # the defaults are GLM-4.1V-9B's numbers (SPEC §6)


def _tiny() -> Glm4vConfig:
    """Every kind of layer, tiny: for tests and CPU smoke runs (vocab big enough for GLM's special ids
    is not needed here: the tiny ids sit at the top of a 320-token vocabulary)."""
    return Glm4vConfig(
        text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, mrope_section=(2, 1, 1), sandwich_norms=True),
        vision=Glm4vVisionConfig(depth=2, hidden_size=32, num_heads=2, image_size=56, patch_size=14,
                                 out_hidden_size=64, intermediate_size=80),
        image_token_id=300, video_token_id=301, image_start_token_id=302, image_end_token_id=303,
        video_start_token_id=304, video_end_token_id=305, eos_token_ids=(310, 311), pad_token_id=310)


PRESETS = {"glm-4.1v-9b": _glm41v_9b, "glm4v-tiny": _tiny}
