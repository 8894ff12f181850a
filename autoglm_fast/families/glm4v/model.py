"""GLM-4.1V in plain PyTorch: transformers' `Glm4vForConditionalGeneration`, math and parameter names.

    image -> Glm4vVisionModel (ViT, 2D RoPE, 2x2 merge) -> one embedding per LLM image token, spliced
    at the `<|image|>` placeholders -> GLM decoder with sandwich norms and M-RoPE -> lm_head

The decoder is our GLM (`reference/glm.py`) with `TextConfig.mrope_section` and `sandwich_norms` on,
so the fast GLM layers and the paged cache serve both families. Parameter names are transformers'
(`model.visual.*`, `model.language_model.*`, `lm_head.*`), so a checkpoint directory loads as it ships.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from ...reference.glm import GlmModel, KVCache, make_caches
from .config import Glm4vConfig
from .positions import mrope_positions
from .vision import Glm4vVisionModel


class Glm4vModel(nn.Module):
    """transformers' `Glm4vModel` container: only its names matter here."""

    def __init__(self, config: Glm4vConfig):
        super().__init__()
        self.visual = Glm4vVisionModel(config.vision)
        self.language_model = GlmModel(config.text)


class Glm4vForConditionalGeneration(nn.Module):
    def __init__(self, config: Glm4vConfig):
        super().__init__()
        if not isinstance(config, Glm4vConfig):
            raise TypeError(f"config must be a Glm4vConfig, got {type(config).__name__}")
        self.config = config
        self.model = Glm4vModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- construction, weights -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Glm4vConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", quantization=None,
                    tensor_parallel=None) -> "Glm4vForConditionalGeneration":
        """Seeded random weights, allocated once in `dtype` on `device`; quantization: a quant.QuantConfig;
        tensor_parallel: a parallel.TensorParallel, to build that rank's part."""
        from ...weights import random_model
        return random_model(cls, config, seed, dtype, device, quantization, tensor_parallel)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        quantization=None, tensor_parallel=None) -> "Glm4vForConditionalGeneration":
        """A transformers checkpoint directory (config.json, generation_config.json, safetensors), AWQ 4-bit
        ones included (their quantization_config says so); quantization: a quant.QuantConfig (RTN at load);
        tensor_parallel: a parallel.TensorParallel (that rank's part alone is read)."""
        from ...quant.awq import checkpoint_awq_settings
        from ...weights import load_checkpoint, meta_model
        directory = Path(directory)
        awq = checkpoint_awq_settings(directory)
        model, shards = meta_model(cls, Glm4vConfig.load(directory), tensor_parallel, quantization, awq)
        expected = set(model.state_dict())
        if model.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        load_checkpoint(model, directory, hf_name, expected, dtype, device, quantization, awq, shards)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
        return model.eval()

    checkpoint_name = staticmethod(lambda key: hf_name(key))  # a checkpoint tensor name -> ours

    def quantization_roles(self) -> dict[str, list[nn.Module]]:
        """What weight-only quantization may replace (quant/quantize.py): the decoder, lm_head, the ViT."""
        return {"decoder": [self.model.language_model], "lm_head": [self.lm_head], "towers": [self.model.visual]}

    def parts(self) -> dict[str, list[nn.Module]]:
        """As SPEC §6 counts them: the language model includes its embedding table; a tied lm_head is in it."""
        return {"language_model": [self.model.language_model], "vision": [self.model.visual],
                "lm_head": [] if self.config.tie_word_embeddings else [self.lm_head]}

    def parameter_counts(self) -> dict[str, int]:
        from ...quant.memory import parameter_count, part_sizes
        return part_sizes(self.parts(), parameter_count)

    def weight_bytes(self) -> dict[str, int]:
        """Bytes per part as stored (quantized layers packed)."""
        from ...quant.memory import part_sizes, weight_bytes
        return part_sizes(self.parts(), weight_bytes)

    def setup_caches(self, batch_size: int, max_len: int) -> list[KVCache]:
        return make_caches(self.config.text, batch_size, max_len, self.model.language_model.embed_tokens.weight)

    # ---- inputs --------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Processed patches [sum t*h*w, patch_dim] -> [sum t*h*w / 4, hidden]: one row per image token."""
        return self.model.visual(pixel_values.to(self.model.language_model.embed_tokens.weight.dtype), image_grid_thw)

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, H] with image rows written at the `<|image|>` placeholders, in order."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        have = 0 if image_embeds is None else image_embeds.shape[0]
        if int(slots.sum()) != have:
            raise ValueError(f"input_ids hold {int(slots.sum())} image placeholder tokens but {have} image "
                             "embeddings were given")
        if have:
            embeds[slots] = image_embeds.to(embeds.dtype)
        return embeds

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_grid_thw: Tensor | None = None,
                positions: Tensor | None = None, rope_positions: Tensor | None = None,
                caches: list[KVCache] | None = None) -> Tensor:
        """Logits [B, T, vocab]. A whole prompt: input_ids [1, T] (+ its images); the M-RoPE rows come
        from `mrope_positions`. Later steps pass their own positions [B, T] and rope_positions [3, B, T]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw go together")
        images = None if pixel_values is None else self.encode_images(pixel_values, image_grid_thw)
        embeds = self.embed(input_ids, images)
        B, T = input_ids.shape
        if rope_positions is None:
            if B != 1:
                raise ValueError("pass rope_positions for a batch of prompts (their M-RoPE rows differ)")
            rope_positions = mrope_positions(input_ids[0], image_grid_thw, self.config)[0][:, None].to(
                input_ids.device)
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden = self.model.language_model(embeds, positions, caches, rope_positions=rope_positions)
        return self.lm_head(hidden)


_OLD_LM = re.compile(r"^model\.(?!language_model\.|visual\.)")


def hf_name(key: str) -> str | None:
    """A checkpoint tensor name -> ours: transformers 5 names pass unchanged; 4.5x-era names
    (`model.layers.*`, top-level `visual.*`) move under `model.language_model` / `model.visual`."""
    if "rotary_emb" in key:
        return None
    if key.startswith("visual."):
        return "model." + key
    return _OLD_LM.sub("model.language_model.", key)
