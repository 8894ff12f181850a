"""`make demo`: the shipped nano checkpoint answers a vision, an audio and a text question through the
engine (fast kernels where they can run). Also the synthetic screenshot and tone the tests use."""
from __future__ import annotations

import math

import torch

from .config import AutoGLMPhoneConfig


def demo_image(size: int = 96):
    """A synthetic 'screenshot': colour gradient with a dark disc, made with Pillow."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size))
    img.putdata([(4 * x % 256, 4 * y % 256, 128) for y in range(size) for x in range(size)])
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(20, 20, 60))
    return img


def demo_tone(config: AutoGLMPhoneConfig, seconds: float = 1.0, hz: float = 440.0) -> torch.Tensor:
    sr = config.audio.sampling_rate
    t = torch.arange(int(seconds * sr)) / sr
    return 0.5 * torch.sin(2 * math.pi * hz * t)


def build_prompt(config: AutoGLMPhoneConfig, text_ids: list[int], num_audio_tokens: int) -> list[int]:
    """[image block] [audio block] text, with the placeholder runs the model splices media into."""
    return (config.placeholder_block("image", config.vision.num_tokens)
            + config.placeholder_block("audio", num_audio_tokens) + text_ids)


DEMO_QUESTIONS = (  # (what the media hold, the user's content) - one per part of the model
    ("image: a blue triangle on the left", "image", "What shape is it?"),
    ("audio: three high beeps", "audio", "How many beeps?"),
    ("text only", None, "你是谁？"),
)


def demo_media(config: AutoGLMPhoneConfig):
    """The demo's image (a blue triangle on the left) and clip (three high beeps), as the nano model
    was trained to see and hear them (autoglm_fast/train/data.py)."""
    import numpy as np

    from .train import data
    rng = np.random.default_rng(2026)
    return (data.make_image("triangle", "blue", "left", config.vision.image_size, rng),
            data.make_tones(3, "high", rng))


def write_media(directory: str, model: str | None = None) -> list[str]:
    """The demo's image (PNG) and clip (16-bit WAV) as files, for `autoglm-fast generate --image --audio`."""
    import wave
    from pathlib import Path

    from .train.eval import default_checkpoint
    config = AutoGLMPhoneConfig.from_checkpoint(model or default_checkpoint())
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    image, clip = demo_media(config)
    paths = out / "shape.png", out / "beeps.wav"
    image.save(paths[0])
    with wave.open(str(paths[1]), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(config.audio.sampling_rate)
        w.writeframes((clip * 32767).round().astype("<i2").tobytes())
    return [str(p) for p in paths]


def run_demo(model: str | None = None, backend: str | None = None, max_tokens: int = 64) -> list[str]:
    """Ask the shipped nano checkpoint (or `model`) a vision, an audio and a text question; print and
    return the three answers."""
    import time

    from .engine import Engine, SamplingParams
    from .train.eval import default_checkpoint
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    path = model or default_checkpoint()
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(path, backend=backend)
    counts = engine.model.parameter_counts()
    print(f"autoglm-fast demo: {path} ({engine.backend} backend on {engine.device}, {engine.dtype}; "
          f"loaded in {time.perf_counter() - t0:.1f} s)")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    image, clip = demo_media(engine.config)
    answers = []
    for what, kind, question in DEMO_QUESTIONS:
        media = [{"type": kind, kind: image if kind == "image" else clip}] if kind else []
        messages = [{"role": "user", "content": media + [{"type": "text", "text": question}]}]
        t0 = time.perf_counter()
        out = engine.generate([None], SamplingParams(max_tokens=max_tokens, temperature=0.0), messages=messages,
                              enable_thinking=False)[0]
        if out.error:
            raise ValueError(out.error)
        answers.append(out.text.strip())
        print(f"[{what}] {question}\n  -> {answers[-1]}   ({1e3 * (time.perf_counter() - t0):.0f} ms, "
              f"{out.prompt_tokens} prompt + {out.completion_tokens} generated tokens)")
    return answers
