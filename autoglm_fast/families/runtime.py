"""What the engine, its runners and the CUDA graphs need from a model family: one small interface.

    prepare(...)          request -> prompt token ids + preprocessed media (at add_request: bad input
                          fails there, nothing is queued)
    admit(req)            encoders once per request: req.prompt_embeds [T, H] and req.state
    step_embeds(...)      a step's token embeddings, sequence after sequence
    rope_positions(...)   M-RoPE rows for a step's tokens, or None when the decoder's rotary uses the
                          plain positions
    decode_inputs(rows)   per-row device constants a decode step reads (DecodeInputs below)
    cache_keys(ids, media) which media each prompt position's K/V depends on (prefix caching)
    backbone, lm_head     the GLM decoder (paged cache, fast layers, graphs) and the output projection

Everything else (scheduling, the paged cache, sampling, streaming) is the engine's and the same for
every family.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..config import TextConfig
from ..parallel.sharding import GatherLogits
from ..prefix_cache import MediaKeys, media_digest


class FamilyRuntime(ABC):
    def __init__(self, model: nn.Module, checkpoint: str | Path | None = None, **options):
        """checkpoint: the directory the model came from (processor and template files), None for a preset.
        options: family-specific request settings (e.g. mm_processor_kwargs); unknown ones are an error."""
        if options:
            raise ValueError(f"{type(self).__name__} takes no options {sorted(options)}")
        self.model, self.checkpoint = model, checkpoint

    # ---- what the decoder is ----------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text(self) -> TextConfig:
        return self.model.config.text

    @property
    @abstractmethod
    def backbone(self) -> nn.Module:
        """The GLM decoder: backbone(embeds [1, N, H], positions [1, N], caches, rope_positions=)."""

    @property
    def lm_head(self):
        """The output projection as the engine calls it: hidden [N, H] -> logits [N, vocab], all-gathered from
        the ranks' vocabulary shares on a tensor-parallel rank (parallel/sharding.py)."""
        tp = getattr(self.model, "tensor_parallel", None)
        return self.model.lm_head if tp is None else GatherLogits(self.model, tp, self.text.vocab_size)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.backbone.embed_tokens

    @property
    def prompt_opens_think(self) -> bool:
        """True where the generation prompt itself opens `<think>` (the reply starts inside reasoning);
        False where the model writes its own tags (GLM-4.1V), so its text is passed on as generated."""
        return False

    @property
    def never_sample(self) -> list[int]:
        """Ids that are input-only (media placeholders): a generated one would have nothing to splice."""
        return []

    def decode_weight_count(self) -> int:
        """Parameters one decode step reads: the decoder and lm_head, one row of the embedding table aside
        (a quantized layer counts the weights it stands for)."""
        from ..quant.memory import parameter_count
        return parameter_count(self.backbone) - self.embed_tokens.weight.numel() + parameter_count(self.model.lm_head)

    def decode_weight_bytes(self) -> int:
        """Bytes one decode step reads of the weights, as stored (quantized layers packed): the roofline's."""
        from ..quant.memory import weight_bytes
        embed = self.embed_tokens.weight
        return weight_bytes(self.backbone) - embed.numel() * embed.element_size() + weight_bytes(self.model.lm_head)

    def drop_encoders(self, **keep: bool) -> None:
        """Free encoders a deployment does not want (keyword per encoder, e.g. vision=False)."""
        if any(not v for v in keep.values()):
            raise ValueError(f"{type(self).__name__} cannot drop {[k for k, v in keep.items() if not v]}")

    # ---- requests ---------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, tokenizer, *, prompt=None, messages=None, images=(), audio=(),
                enable_thinking: bool = True) -> tuple[list[int], dict]:
        """(prompt token ids with media placeholders expanded, preprocessed media)."""

    @abstractmethod
    def admit(self, req) -> None:
        """Run the encoders once: set req.prompt_embeds [T, H] and req.state."""

    @abstractmethod
    def step_embeds(self, requests: list, num_tokens: list[int]) -> torch.Tensor:
        """Embeddings [sum(num_tokens), H] of each request's next num_tokens[i] uncached tokens."""

    def rope_positions(self, requests: list, num_tokens: list[int]) -> torch.Tensor | None:
        return None

    def graph_encoders(self, graphs) -> None:
        """Route the encoders' heavy part through `graphs` (engine/encoder_graphs.py); default: none."""

    def decode_inputs(self, num_rows: int) -> "DecodeInputs":
        return DecodeInputs(self, num_rows)

    def cache_keys(self, prompt_ids: list[int], media: dict) -> MediaKeys:
        """[(position, digest)]: the K/V of every token from `position` on depends on that media item
        (prefix_cache.py). The default is safe for any family: all the media, from the first token."""
        digest = media_digest(media)
        return [] if digest is None else [(0, digest)]


class DecodeInputs:
    """A decode step's inputs from device state alone (no host data): each running request's row holds
    what its generated tokens need besides their ids, set once when it takes the row. The default:
    plain token embeddings at the plain positions."""

    def __init__(self, runtime: FamilyRuntime, num_rows: int):
        self.runtime = runtime

    def set_row(self, row: int, req) -> None:
        """Fill row `row` for an admitted request (its family state is in req.state)."""

    def embeds(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B, H] embeddings of generated tokens ids [B] of rows [B]."""
        return self.runtime.embed_tokens(ids)

    def rope_positions(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """[rows, B] M-RoPE positions of the tokens at cache positions [B], or None (plain rotary)."""
        return None
