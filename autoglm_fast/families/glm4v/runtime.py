"""GLM-4.1V (the released AutoGLM-Phone-9B) as an engine family.

A request's prompt is rendered with the checkpoint's own chat template (chat.py), its images are
processed as transformers' Glm4vImageProcessor does (image_processing.py), and each `<|image|>`
becomes prod(grid) / 4 placeholder tokens. At admission the vision tower runs once, its rows are
spliced at the placeholders, and the prompt's M-RoPE rows and rope_delta are computed
(positions.py); a generated token is a plain embedding at position `cache_position + rope_delta`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...prefix_cache import tensor_digest
from ..runtime import DecodeInputs, FamilyRuntime
from .chat import expand_image_tokens, load_chat_template, render_chat
from .image_processing import Glm4vImageProcessor
from .model import Glm4vForConditionalGeneration
from .positions import decode_positions, mrope_positions


@dataclass
class Glm4vState:
    rope: torch.Tensor   # int64 [3, T] the prompt's M-RoPE rows (on the model's device)
    rope_delta: int      # generated token i sits at rotary position T + i + rope_delta


class Glm4vRuntime(FamilyRuntime):
    model: Glm4vForConditionalGeneration

    def __init__(self, model: Glm4vForConditionalGeneration, checkpoint: str | Path | None = None, *,
                 mm_processor_kwargs: dict | None = None, content_format: str = "openai",
                 chat_template: str | None = None):
        """mm_processor_kwargs: vLLM's --mm-processor-kwargs (e.g. {"max_pixels": 5000000});
        content_format: vLLM's --chat-template-content-format ("openai" or "string")."""
        super().__init__(model, checkpoint)
        if content_format not in ("openai", "string"):
            raise ValueError(f"content_format must be 'openai' or 'string', got {content_format!r}")
        processor = Glm4vImageProcessor.load(checkpoint) if checkpoint else Glm4vImageProcessor()
        self.processor = processor.with_overrides(**(mm_processor_kwargs or {}))
        if chat_template is None and checkpoint:
            chat_template = load_chat_template(checkpoint)
        self.chat_template, self.content_format = chat_template, content_format

    @property
    def backbone(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def never_sample(self) -> list[int]:
        c = self.config
        return [c.image_token_id, c.video_token_id]

    def decode_inputs(self, num_rows: int) -> DecodeInputs:
        return MRopeDecodeInputs(self, num_rows)

    def graph_encoders(self, graphs) -> None:
        """The vision tower's blocks at a padded patch count (patch embedding, resampled position
        embeddings and the merger stay eager: their shapes follow each image's grid)."""
        visual = self.model.model.visual
        if visual is not None:
            visual.run_blocks = graphs.packed_segments("glm4v vision blocks", visual.run_blocks)

    def drop_encoders(self, vision: bool = True, audio: bool = True) -> None:
        if not vision:  # GLM-4.1V has no audio encoder: nothing else to drop
            self.model.model.visual = None

    # ---- requests ---------------------------------------------------------------------------------
    def prepare(self, tokenizer, *, prompt=None, messages=None, images=(), audio=(), enable_thinking=True):
        if list(audio):
            raise ValueError("GLM-4.1V takes no audio inputs")
        images, c = list(images), self.config
        if messages is not None:
            if self.chat_template is None:
                raise ValueError("this model has no chat template (a preset, not a checkpoint): send a prompt "
                                 "string or token ids, or load a checkpoint directory that ships one")
            text, parts = render_chat(messages, self.chat_template, content_format=self.content_format,
                                      enable_thinking=enable_thinking)
            images = [_image_of(p) for p in parts]
            ids = tokenizer.encode(text, allow_special=True)
        elif isinstance(prompt, str):
            ids = [c.image_start_token_id, c.image_token_id, c.image_end_token_id] * len(images)
            ids += tokenizer.encode(prompt, allow_special=False)
        else:
            return [int(t) for t in prompt], self._preprocess(images)
        media = self._preprocess(images)
        counts = [self.processor.num_image_tokens(g) for g in media.get("image_grid_thw", ())]
        return expand_image_tokens(ids, c.image_token_id, counts), media

    def _preprocess(self, images: list) -> dict:
        if not images:
            return {}
        if self.model.model.visual is None:
            raise ValueError("this engine was built with load_vision=False: image inputs are not available")
        pixel_values, grid = self.processor.preprocess(images)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def admit(self, req) -> None:
        m, device = req.media, self.embed_tokens.weight.device
        grid = m.get("image_grid_thw")
        rope, delta = mrope_positions(req.prompt_ids, grid, self.config)  # validates the placeholder count
        images = self.model.encode_images(m["pixel_values"].to(device), grid.to(device)) if grid is not None else None
        req.prompt_embeds = self.model.embed(torch.tensor([req.prompt_ids], device=device), images)[0]
        req.state = Glm4vState(rope.to(device), delta)

    def step_embeds(self, requests, num_tokens):
        parts, new_ids, where = [], [], []
        for r, n in zip(requests, num_tokens):
            lo, hi, T = r.num_computed, r.num_computed + n, len(r.prompt_ids)
            if lo < T:
                parts.append(r.prompt_embeds[lo:min(hi, T)])
            if hi > T:  # generated tokens: embedded together below, in one lookup
                where.append((len(parts), hi - max(lo, T)))
                parts.append(None)
                new_ids += r.output_ids[max(lo, T) - T:hi - T]
        if new_ids:
            table = self.embed_tokens
            embeds = table(torch.tensor(new_ids, device=table.weight.device))
            start = 0
            for slot, count in where:
                parts[slot], start = embeds[start:start + count], start + count
        return torch.cat(parts)

    def cache_keys(self, prompt_ids, media):
        """Each image keys the blocks from its first placeholder on (the decoder is causal, and the
        M-RoPE positions after an image follow from its grid, which its digest covers): a system prompt
        and history before a new screenshot stay shared."""
        grid = media.get("image_grid_thw")
        starts = [i for i, t in enumerate(prompt_ids) if t == self.config.image_token_id
                  and (i == 0 or prompt_ids[i - 1] != t)]
        if grid is None or len(starts) != len(grid):
            return super().cache_keys(prompt_ids, media)  # malformed: admission reports it; stay safe
        rows = grid.prod(-1).tolist()
        pixels = media["pixel_values"].split(rows)
        return [(start, tensor_digest(p, g)) for start, p, g in zip(starts, pixels, grid)]

    def rope_positions(self, requests, num_tokens):
        rows = []
        for r, n in zip(requests, num_tokens):
            lo, hi, T = r.num_computed, r.num_computed + n, len(r.prompt_ids)
            if lo < T:
                rows.append(r.state.rope[:, lo:min(hi, T)])
            if hi > T:
                start = max(lo, T)
                rows.append(decode_positions(start, hi - start, r.state.rope_delta).to(r.state.rope.device))
        return torch.cat(rows, dim=1)


class MRopeDecodeInputs(DecodeInputs):
    """A generated token sits at rotary position `cache_position + rope_delta` on all three M-RoPE rows;
    each row keeps its request's rope_delta."""

    def __init__(self, runtime: Glm4vRuntime, num_rows: int):
        super().__init__(runtime, num_rows)
        self.rope_delta = torch.zeros(num_rows, dtype=torch.int64, device=runtime.embed_tokens.weight.device)

    def set_row(self, row: int, req) -> None:
        self.rope_delta[row] = req.state.rope_delta

    def rope_positions(self, positions, rows):
        return (positions + self.rope_delta[rows]).expand(3, -1).contiguous()


def _image_of(part: dict):
    """The image an OpenAI-style content part carries (a data: URL, path, bytes or PIL image) as the
    server hands it over: under "image", else the image_url's "url"."""
    if "image" in part:
        return part["image"]
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url
