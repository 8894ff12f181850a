"""Greedy generation on the eager reference, step by step through the KV cache.

This is the simplest correct loop (gpt-fast style) and the yardstick for the engine: prefill the
whole prompt once, then one token per step at explicit positions, media summaries carried along.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import AutoGLMPhoneForCausalLM


@dataclass
class GenerationResult:
    tokens: list[list[int]]                 # generated ids per row, up to and including a stop token
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def greedy_generate(model: AutoGLMPhoneForCausalLM, input_ids: Tensor, max_new_tokens: int, *,
                    pixel_values: Tensor | None = None, input_features: Tensor | None = None,
                    audio_num_samples: list[int] | None = None,
                    stop_token_ids: tuple[int, ...] | None = None) -> GenerationResult:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    stops = torch.tensor(stop_token_ids or model.config.eos_token_ids, device=device)
    B, T = input_ids.shape
    t = {"start": _clock(device)}
    images = None if pixel_values is None else model.encode_images(pixel_values.to(device))
    t["vision"] = _clock(device)
    audio = None if input_features is None else model.encode_audio(input_features.to(device), audio_num_samples)
    t["audio"] = _clock(device)
    embeds, context = model.embed(input_ids, images, audio)
    caches = model.setup_caches(B, T + max_new_tokens)
    logits = model(inputs_embeds=embeds, positions=torch.arange(T, device=device), caches=caches,
                   context=context).logits[:, -1]
    t["prefill"] = _clock(device)
    out, done = [], torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        out.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        positions = torch.full((B, 1), T + step, device=device)
        logits = model(token[:, None], positions=positions, caches=caches, context=context).logits[:, -1]
    t["decode"] = _clock(device)
    tokens = []
    for row in torch.stack(out, 1).tolist():
        hit = next((i for i, tok in enumerate(row) if tok in stops.tolist()), None)
        tokens.append(row if hit is None else row[: hit + 1])
    stages = ["start", "vision", "audio", "prefill", "decode"]
    timings = {s: t[s] - t[p] for p, s in zip(stages, stages[1:])}
    return GenerationResult(tokens, timings)
