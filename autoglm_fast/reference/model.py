"""AutoGLM-Phone: GLM decoder + CLIP vision tower + Whisper encoder, joined by the article's
dual-path adapters, per-modality connectors and the gated three-way fusion.

Data flow for one request:
    image -> CLIP -> vision_adapter -> vision_connector -> tokens spliced at <|image|> placeholders
    audio -> Whisper -> keep real frames, avg-pool by 4 -> audio_adapter -> audio_connector -> <|audio|> slots
    every other (text) position j: z_j = fusion(t_j, mean(vision tokens), mean(audio tokens))
    -> GLM decoder -> lm_head
Parameter names: `model.*` / `lm_head.*` are HF GlmForCausalLM's, `vision_tower.*` HF CLIPVisionModel's,
`audio_tower.*` HF WhisperEncoder's, so real checkpoints of the three parts map in by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AutoGLMPhoneConfig
from .adapter import DualPathAdapter
from .clip import CLIPVisionModel
from .fusion import GatedFusion
from .glm import GlmModel, KVCache, check_positions, default_positions, make_caches
from .whisper import WhisperEncoder

# Which top-level modules make up each part, for parameter counts and partial loading.
PARTS = {
    "backbone": ("model", "lm_head"),
    "vision": ("vision_tower",),
    "audio": ("audio_tower",),
    "adapters": ("vision_adapter", "audio_adapter", "vision_connector", "audio_connector"),
    "fusion": ("fusion",),
}


@dataclass
class ModalContext:
    """Per-sequence summaries the gated fusion needs at every step, prompt and generated tokens alike."""
    vision: Tensor      # [B, H] mean of the sequence's adapted vision tokens (0 where absent)
    audio: Tensor       # [B, H]
    has_vision: Tensor  # [B] bool
    has_audio: Tensor   # [B] bool

    @classmethod
    def empty(cls, batch: int, hidden: int, like: Tensor) -> "ModalContext":
        zeros, no = like.new_zeros(batch, hidden), torch.zeros(batch, dtype=torch.bool, device=like.device)
        return cls(zeros, zeros.clone(), no, no.clone())

    def select(self, rows: Tensor | list[int]) -> "ModalContext":
        return ModalContext(self.vision[rows], self.audio[rows], self.has_vision[rows], self.has_audio[rows])


@dataclass
class CausalLMOutput:
    logits: Tensor
    context: ModalContext


class AutoGLMPhoneForCausalLM(nn.Module):
    def __init__(self, config: AutoGLMPhoneConfig):
        super().__init__()
        if not isinstance(config, AutoGLMPhoneConfig):
            raise TypeError(f"config must be an AutoGLMPhoneConfig, got {type(config).__name__}")
        self.config = config
        text, ad = config.text, config.adapter
        self.model = GlmModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vision_tower = CLIPVisionModel(config.vision)
        self.audio_tower = WhisperEncoder(config.audio)
        self.vision_adapter = DualPathAdapter(config.vision.hidden_size, ad.hidden_size, ad.num_heads,
                                              ad.ffn_multiplier, ad.dropout)
        self.audio_adapter = DualPathAdapter(config.audio.d_model, ad.hidden_size, ad.num_heads,
                                             ad.ffn_multiplier, ad.dropout)
        self.vision_connector = nn.Linear(ad.hidden_size, text.hidden_size)
        self.audio_connector = nn.Linear(ad.hidden_size, text.hidden_size)
        self.fusion = GatedFusion(text.hidden_size)

    # ---- construction, weights -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: AutoGLMPhoneConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", quantization=None,
                    tensor_parallel=None) -> "AutoGLMPhoneForCausalLM":
        """Seeded random weights, allocated once in `dtype` on `device` (no fp32 detour); quantization: a
        quant.QuantConfig (each target Linear quantized as it is made); tensor_parallel: a
        parallel.TensorParallel, to build that rank's part."""
        from ..weights import random_model
        return random_model(cls, config, seed, dtype, device, quantization, tensor_parallel)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        quantization=None, tensor_parallel=None) -> "AutoGLMPhoneForCausalLM":
        from ..weights import load_pretrained
        return load_pretrained(cls, directory, dtype=dtype, device=device, quantization=quantization,
                               tensor_parallel=tensor_parallel)

    checkpoint_name = staticmethod(lambda key: key)  # our own checkpoints use the model's names

    def quantization_roles(self) -> dict[str, list[nn.Module]]:
        """What weight-only quantization may replace (quant/quantize.py): the decoder, lm_head, the towers."""
        return {"decoder": [self.model], "lm_head": [self.lm_head], "towers": [self.vision_tower, self.audio_tower]}

    def save_pretrained(self, directory, max_shard_size: int | str = "2GB", tokenizer=None) -> None:
        """See `weights.save_pretrained`; pass the tokenizer (or use `Engine.save_pretrained`) so the
        checkpoint loads without a tokenizer option."""
        from ..weights import save_pretrained
        save_pretrained(self, directory, max_shard_size=max_shard_size, tokenizer=tokenizer)

    def load_hf_weights(self, path, part: str | None = None, **kwargs) -> str:
        """Load a Hugging Face GlmForCausalLM / CLIPVisionModel / Whisper checkpoint into its part
        (see `weights.load_hf_weights`; dtype/device apply to parts still on the meta device)."""
        from ..weights import load_hf_weights
        return load_hf_weights(self, path, part=part, **kwargs)

    def parts(self) -> dict[str, list[nn.Module | None]]:
        return {part: [getattr(self, m) for m in mods] for part, mods in PARTS.items()}

    def parameter_counts(self) -> dict[str, int]:
        from ..quant.memory import parameter_count, part_sizes
        return part_sizes(self.parts(), parameter_count)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes per part as stored (quantized layers packed)."""
        from ..quant.memory import part_sizes, weight_bytes
        return part_sizes(self.parts(), weight_bytes)

    def setup_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        return make_caches(self.config.text, batch_size, max_len, self.model.embed_tokens.weight)

    # ---- encoders ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] preprocessed images -> [N, num_image_tokens, text_hidden]."""
        feats = self.vision_tower(pixel_values.to(self.model.embed_tokens.weight.dtype))
        return self.vision_connector(self.vision_adapter(feats))

    def encode_audio(self, input_features: Tensor, num_samples: list[int]) -> list[Tensor]:
        """[N, mels, frames] log-mel windows + each clip's sample count -> N tensors [tokens_i, text_hidden]."""
        if len(num_samples) != input_features.shape[0]:
            raise ValueError(f"num_samples has {len(num_samples)} entries for {input_features.shape[0]} clips")
        frames = self.audio_tower(input_features.to(self.model.embed_tokens.weight.dtype))
        kept = [self.config.audio.num_frames(n) for n in num_samples]
        pooled, lengths = pool_frames(frames, kept, self.config.audio.pool_stride)
        pad = torch.arange(pooled.shape[1], device=pooled.device)[None] >= lengths[:, None]
        out = self.audio_connector(self.audio_adapter(pooled, key_padding_mask=pad if bool(pad.any()) else None))
        return [out[i, :n] for i, n in enumerate(lengths.tolist())]

    # ---- input embeddings ------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, image_embeds: Tensor | None = None,
              audio_embeds: list[Tensor] | None = None,
              context: ModalContext | None = None) -> tuple[Tensor, ModalContext]:
        """Token embeddings with media spliced at placeholders and text positions gated-fused.

        Image embeddings fill `<|image|>` positions and audio embeddings `<|audio|>` positions, in
        row-major order. Without `context`, each row's vision/audio summaries are the means of the
        media spliced into that row (pass the prompt's context for decode steps and later chunks).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        cfg = self.config
        embeds = self.model.embed_tokens(input_ids)
        is_image = _splice(embeds, input_ids == cfg.image_token_id, image_embeds, "image")
        audio_flat = None if audio_embeds is None else (
            torch.cat(list(audio_embeds)) if len(audio_embeds) else embeds.new_zeros(0, embeds.shape[-1]))
        is_audio = _splice(embeds, input_ids == cfg.audio_token_id, audio_flat, "audio")
        if context is None:
            context = ModalContext(_row_mean(embeds, is_image), _row_mean(embeds, is_audio),
                                   is_image.any(1), is_audio.any(1))
        if cfg.fusion.enabled:
            fused = self.fusion(embeds, context.vision, context.audio, context.has_vision, context.has_audio)
            embeds = torch.where((is_image | is_audio)[..., None], embeds, fused)
        return embeds, context

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, positions: Tensor | None = None,
                caches: list[KVCache] | None = None, *, pixel_values: Tensor | None = None,
                input_features: Tensor | None = None, audio_num_samples: list[int] | None = None,
                context: ModalContext | None = None, inputs_embeds: Tensor | None = None) -> CausalLMOutput:
        """Logits for `input_ids` (or precomputed `inputs_embeds` + `context`) at `positions`.

        Prefill: pass the media; the returned context carries the vision/audio summaries for decoding.
        Decode: pass the new token ids, their positions, the caches and the prompt's context.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            images = None if pixel_values is None else self.encode_images(pixel_values)
            if (input_features is None) != (audio_num_samples is None):
                raise ValueError("input_features and audio_num_samples go together")
            audio = None if input_features is None else self.encode_audio(input_features, audio_num_samples)
            inputs_embeds, context = self.embed(input_ids, images, audio, context)
        elif context is None:
            context = ModalContext.empty(inputs_embeds.shape[0], inputs_embeds.shape[-1], inputs_embeds)
        B, T = inputs_embeds.shape[:2]
        positions = (default_positions((B, T), device=inputs_embeds.device) if positions is None
                     else check_positions(positions, B, T))
        hidden = self.model(inputs_embeds, positions, caches)
        return CausalLMOutput(self.lm_head(hidden), context)


def pool_frames(frames: Tensor, num_frames: list[int], stride: int) -> tuple[Tensor, Tensor]:
    """Average-pool each clip's first num_frames[i] frames in windows of `stride` (last window partial).

    frames [N, P, D] -> ([N, L, D] zero-padded, lengths [N]) with L = max ceil(num_frames / stride).
    """
    N, P, D = frames.shape
    n = torch.tensor(num_frames, device=frames.device)
    valid = (torch.arange(P, device=frames.device)[None] < n[:, None]).to(frames.dtype)  # [N, P]
    padded = math.ceil(P / stride) * stride
    x = nn.functional.pad(frames * valid[..., None], (0, 0, 0, padded - P))
    counts = nn.functional.pad(valid, (0, padded - P)).view(N, -1, stride).sum(-1)
    pooled = x.view(N, -1, stride, D).sum(2) / counts.clamp(min=1)[..., None]
    lengths = torch.div(n + stride - 1, stride, rounding_mode="floor")
    return pooled[:, : int(lengths.max())], lengths


def _splice(embeds: Tensor, slots: Tensor, media: Tensor | None, name: str) -> Tensor:
    """Write media rows into the placeholder slots (in place) after checking the counts agree."""
    want = int(slots.sum())
    have = 0 if media is None else media.reshape(-1, embeds.shape[-1]).shape[0]
    if want != have:
        raise ValueError(f"input_ids hold {want} {name} placeholder tokens but {have} {name} embeddings were given")
    if want:
        embeds[slots] = media.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return slots


def _row_mean(embeds: Tensor, slots: Tensor) -> Tensor:
    weights = slots.float()[..., None]  # sum in fp32: hundreds of fp16 tokens would lose precision
    return ((embeds.float() * weights).sum(1) / weights.sum(1).clamp(min=1)).to(embeds.dtype)
