"""The article's model as an engine family: GLM + CLIP + Whisper + adapters + the gated fusion.

Media are spliced at their placeholders once, at admission; every text token (prompt and generated)
is gated-fused with the request's vision / audio summaries (`ModalContext`), so a generated token's
embedding needs the request's context too (`step_embeds` fuses a step's decodes in one call). For
the same reason every token's K/V depends on all of the request's media, wherever they sit: the
default `cache_keys` (all media, from the first token) is exactly right for prefix caching.
"""
from __future__ import annotations

import torch
from torch import nn

from ..chat import render_chat
from ..reference.audio_processing import audio_batch, load_audio, log_mel_spectrogram
from ..reference.image_processing import load_image, preprocess_images
from ..reference.model import AutoGLMPhoneForCausalLM, ModalContext
from .runtime import DecodeInputs, FamilyRuntime


class AutoGLMPhoneRuntime(FamilyRuntime):
    model: AutoGLMPhoneForCausalLM

    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def prompt_opens_think(self) -> bool:
        return True  # chat.render_chat ends the prompt with `<|assistant|>\n<think>`

    @property
    def never_sample(self) -> list[int]:
        return [self.config.image_token_id, self.config.audio_token_id]

    def decode_inputs(self, num_rows: int) -> DecodeInputs:
        return FusedDecodeInputs(self, num_rows)

    def graph_encoders(self, graphs) -> None:
        """CLIP and Whisper at a padded batch of images / clips (the adapters and connectors stay eager)."""
        for name, tower in (("clip", self.model.vision_tower), ("whisper", self.model.audio_tower)):
            if tower is not None:
                tower.forward = graphs.batched(name, tower.forward)

    def drop_encoders(self, vision: bool = True, audio: bool = True) -> None:
        m = self.model
        if not vision:
            m.vision_tower = m.vision_adapter = m.vision_connector = None
        if not audio:
            m.audio_tower = m.audio_adapter = m.audio_connector = None

    # ---- requests ---------------------------------------------------------------------------------
    def prepare(self, tokenizer, *, prompt=None, messages=None, images=(), audio=(), enable_thinking=True):
        images, clips = list(images), [self._waveform(c) for c in audio]
        if messages is not None:
            ids, images, clips = self._render(tokenizer, messages, enable_thinking)
        elif isinstance(prompt, str):
            ids = self._media_block(images, clips) + tokenizer.encode(prompt, allow_special=False)
        else:
            ids = [int(t) for t in prompt]
        return ids, self._preprocess(images, clips)

    def admit(self, req) -> None:
        """The encoders, once. Whisper's log-mel runs here, on the model's device (the 30 s window's STFT
        is a few ms on a CPU, far less on a GPU), not when the request is added."""
        m, model, device = req.media, self.model, self.embed_tokens.weight.device
        images = model.encode_images(m["pixel_values"].to(device)) if "pixel_values" in m else None
        audio = None
        if "waveforms" in m:
            features = log_mel_spectrogram(m["waveforms"].to(device), self.config.audio)
            audio = model.encode_audio(features, m["num_samples"])
        embeds, req.state = model.embed(torch.tensor([req.prompt_ids], device=device), images, audio)
        req.prompt_embeds = embeds[0]

    def step_embeds(self, requests, num_tokens):
        """Decode rows (one generated token each) are embedded and fused in a single call, with the
        requests' media summaries stacked; prompt chunks come from the admitted embeddings."""
        parts: list[torch.Tensor | None] = [None] * len(requests)
        decode = [i for i, (r, n) in enumerate(zip(requests, num_tokens))
                  if n == 1 and r.num_computed >= len(r.prompt_ids)]
        if decode:
            rows = [requests[i] for i in decode]
            ids = torch.tensor([[r.output_ids[r.num_computed - len(r.prompt_ids)]] for r in rows],
                               device=rows[0].prompt_embeds.device)
            ctx = ModalContext(*(torch.cat([getattr(r.state, f) for r in rows])
                                 for f in ("vision", "audio", "has_vision", "has_audio")))
            embeds = self.model.embed(ids, context=ctx)[0][:, 0]
            for j, i in enumerate(decode):
                parts[i] = embeds[j:j + 1]
        for i, (r, n) in enumerate(zip(requests, num_tokens)):
            if parts[i] is None:
                parts[i] = self._chunk_embeds(r, n)
        return torch.cat(parts)

    def _chunk_embeds(self, req, n: int) -> torch.Tensor:
        lo, hi, T = req.num_computed, req.num_computed + n, len(req.prompt_ids)
        parts = []
        if lo < T:
            parts.append(req.prompt_embeds[lo:min(hi, T)])
        if hi > T:
            ids = torch.tensor([req.output_ids[max(lo, T) - T:hi - T]], device=req.prompt_embeds.device)
            parts.append(self.model.embed(ids, context=req.state)[0][0])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- input preparation --------------------------------------------------------------------------
    def _render(self, tokenizer, messages, enable_thinking):
        images, clips = [], []

        def media_tokens(part):
            kind = "image" if part.get("type") in ("image", "image_url") else "audio"
            data = part.get(kind, part.get("image_url") or part.get("input_audio"))
            if kind == "image":
                images.append(data)
                return self.config.vision.num_tokens
            wave = self._waveform(data)
            clips.append(wave)
            return self.config.audio.num_tokens(min(len(wave), self.config.audio.chunk_samples))

        chat = render_chat(messages, tokenizer, self.config, enable_thinking=enable_thinking,
                           media_tokens=media_tokens)
        return chat.token_ids, images, clips

    def _media_block(self, images, clips) -> list[int]:
        c, ids = self.config, []
        for _ in images:
            ids += c.placeholder_block("image", c.vision.num_tokens)
        for clip in clips:
            ids += c.placeholder_block("audio", c.audio.num_tokens(min(len(clip), c.audio.chunk_samples)))
        return ids

    def _waveform(self, clip) -> torch.Tensor:
        """Mono samples at the model's rate: a 1-D array is taken as already at that rate, anything
        else (WAV path or bytes) is decoded, down-mixed and resampled."""
        rate = self.config.audio.sampling_rate
        if isinstance(clip, torch.Tensor) or hasattr(clip, "__array__"):
            return load_audio(clip, sampling_rate=rate, target_rate=rate)
        return load_audio(clip, target_rate=rate)

    def _preprocess(self, images, clips) -> dict:
        media = {}
        if images:
            if self.model.vision_tower is None:
                raise ValueError("this engine was built with load_vision=False: image inputs are not available")
            media["pixel_values"] = preprocess_images([load_image(i) for i in images], self.config.vision)
        if clips:
            if self.model.audio_tower is None:
                raise ValueError("this engine was built with load_audio=False: audio inputs are not available")
            media["waveforms"], media["num_samples"] = audio_batch(clips, self.config.audio)
        return media


class FusedDecodeInputs(DecodeInputs):
    """Each row keeps its request's media summaries (made once, at admission): a generated token is its
    embedding gated-fused with them, in one fusion launch for the whole step."""

    def __init__(self, runtime: AutoGLMPhoneRuntime, num_rows: int):
        super().__init__(runtime, num_rows)
        weight = runtime.embed_tokens.weight
        self.context = ModalContext.empty(num_rows, weight.shape[1], weight)

    def set_row(self, row: int, req) -> None:
        for name in ("vision", "audio", "has_vision", "has_audio"):
            getattr(self.context, name)[row] = getattr(req.state, name)[0]

    def embeds(self, ids, rows):
        model = self.runtime.model
        embeds = self.runtime.embed_tokens(ids)[:, None]
        if not model.config.fusion.enabled:
            return embeds[:, 0]
        c = self.context.select(rows)
        return model.fusion(embeds, c.vision, c.audio, c.has_vision, c.has_audio)[:, 0]
