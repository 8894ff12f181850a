"""Batches and one optimisation step for the nano model on the synthetic tasks (plain autograd on the
eager reference model; the full training loop, checkpointing and eval come in later phases of #15).

A row is exactly what inference sees: render_chat's prompt (media placeholders at the config's ids,
generation prompt included) followed by the target text and the end-of-turn token. Only the target
and its end token are scored, so the model learns to answer, not to predict questions or media.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..chat import render_chat
from ..config import AutoGLMPhoneConfig
from ..reference.audio_processing import preprocess_audio
from ..reference.image_processing import preprocess_images
from ..reference.model import AutoGLMPhoneForCausalLM
from ..tokenizer import Tokenizer
from .data import target_text

IGNORE = -100  # F.cross_entropy's ignore_index: prompt and padding positions


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, T], right-padded with pad_token_id
    labels: torch.Tensor           # [B, T], the next token at each scored position, else IGNORE
    pixel_values: torch.Tensor | None
    input_features: torch.Tensor | None
    audio_num_samples: list[int] | None

    def model_inputs(self) -> dict:
        return {"pixel_values": self.pixel_values, "input_features": self.input_features,
                "audio_num_samples": self.audio_num_samples}


def encode_example(example: dict, tokenizer: Tokenizer, config: AutoGLMPhoneConfig) -> tuple[list[int], list[int], list]:
    """(ids, labels, media parts in prompt order) for one example; labels are already shifted."""
    def media_tokens(part: dict) -> int | None:
        return config.audio.num_tokens(len(part["audio"])) if part["type"] == "audio" else None
    prompt = render_chat(example["messages"], tokenizer, config, enable_thinking=example["enable_thinking"],
                         media_tokens=media_tokens)
    # The target is model output, so its `</think>` is the special token (allow_special=True).
    target = tokenizer.encode(target_text(example), allow_special=True) + [config.eos_token_ids[0]]
    ids = prompt.token_ids + target
    labels = [IGNORE] * (len(prompt.token_ids) - 1) + target + [IGNORE]  # position t predicts ids[t + 1]
    return ids, labels, [m["part"] for m in prompt.media]


def make_batch(examples: list[dict], tokenizer: Tokenizer, config: AutoGLMPhoneConfig) -> Batch:
    rows = [encode_example(e, tokenizer, config) for e in examples]
    T = max(len(ids) for ids, _, _ in rows)
    pad = config.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (T - len(lab)) for _, lab, _ in rows])
    # The model splices media into placeholders in row-major order, so media go in the same order.
    parts = [p for _, _, media in rows for p in media]
    images = [p["image"] for p in parts if p["type"] == "image"]
    clips = [p["audio"] for p in parts if p["type"] == "audio"]
    pixel_values = preprocess_images(images, config.vision) if images else None
    feats, lengths = preprocess_audio(clips, config.audio) if clips else (None, None)
    return Batch(input_ids, labels, pixel_values, feats, lengths)


def loss_fn(model: AutoGLMPhoneForCausalLM, batch: Batch, image_token_dropout: float = 0.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy averaged over each row's scored tokens, then over rows. Per row, not per token:
    the media answers are one or two tokens, the chat answers dozens, and a per-token mean would give
    the vision and audio tasks almost no gradient (measured: vision stayed at chance).

    image_token_dropout: the share of rows whose spliced image tokens are zeroed after the vision
    summary v has been taken from them. Vision then reaches those rows' text only through the gated
    fusion (g_v * v); the rest keep the model used to real image tokens at inference."""
    if not 0.0 <= image_token_dropout <= 1.0:
        raise ValueError(f"image_token_dropout must be in [0, 1], got {image_token_dropout}")
    m = batch.model_inputs()  # model.forward's own steps, with the image slots blanked in between
    images = None if m["pixel_values"] is None else model.encode_images(m["pixel_values"])
    audio = None if m["input_features"] is None else model.encode_audio(m["input_features"], m["audio_num_samples"])
    embeds, context = model.embed(batch.input_ids, images, audio)  # context: v from the real tokens
    B = batch.input_ids.shape[0]  # no draw at 0: the global RNG (adapter dropout) sees what it always saw
    rows = (torch.rand(B, generator=generator) < image_token_dropout if image_token_dropout
            else torch.zeros(B, dtype=torch.bool))
    blank = (batch.input_ids == model.config.image_token_id) & rows[:, None].to(batch.input_ids.device)
    logits = model(inputs_embeds=embeds.masked_fill(blank[..., None], 0.0), context=context).logits
    per_token = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    scored = (batch.labels != IGNORE).float()
    return (per_token.sum(1) / scored.sum(1).clamp(min=1)).mean()


def make_model(config: AutoGLMPhoneConfig, seed: int = 0) -> AutoGLMPhoneForCausalLM:
    """Seeded random nano weights in float32, in training mode (adapter dropout on)."""
    torch.manual_seed(seed)  # dropout masks
    return AutoGLMPhoneForCausalLM.from_config(config, seed=seed).train()


def train_step(model: AutoGLMPhoneForCausalLM, optimizer: torch.optim.Optimizer, batch: Batch,
               max_grad_norm: float = 1.0, **loss_options) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, **loss_options)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss.detach().item()
