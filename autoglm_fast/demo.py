"""`make demo`: one image + one tone + a text prompt through every part of the model, greedy decoding
on the eager reference, with per-part timings. Seeded random weights: the tokens are arbitrary but
reproducible; the point is that every stage runs end to end."""
from __future__ import annotations

import math

import torch

from .config import AutoGLMPhoneConfig
from .reference.audio_processing import preprocess_audio
from .reference.generate import greedy_generate
from .reference.image_processing import preprocess_images
from .reference.model import AutoGLMPhoneForCausalLM


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


def write_media(preset: str, directory: str) -> list[str]:
    """The demo's screenshot (PNG) and 1 s tone (16-bit WAV) as files, for `autoglm-fast generate`."""
    import wave
    from pathlib import Path
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    image, tone = out / "screen.png", out / "tone.wav"
    demo_image().save(image)
    config = AutoGLMPhoneConfig.preset(preset)
    pcm = (demo_tone(config) * 32767).round().to(torch.int16).numpy().tobytes()
    with wave.open(str(tone), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(config.audio.sampling_rate)
        w.writeframes(pcm)
    return [str(image), str(tone)]


def build_prompt(config: AutoGLMPhoneConfig, text_ids: list[int], num_audio_tokens: int) -> list[int]:
    """[image block] [audio block] text, with the placeholder runs the model splices media into."""
    return (config.placeholder_block("image", config.vision.num_tokens)
            + config.placeholder_block("audio", num_audio_tokens) + text_ids)


def run_demo(preset: str = "nano", prompt: str = "What is on the screen, and what do you hear?",
             max_new_tokens: int = 16, seed: int = 0) -> list[int]:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = AutoGLMPhoneConfig.preset(preset)
    if config.text.vocab_size < 256:
        raise ValueError("the demo encodes text as UTF-8 bytes and needs a vocabulary of at least 256")
    torch.manual_seed(seed)
    model = AutoGLMPhoneForCausalLM.from_config(config, seed=seed)
    counts = model.parameter_counts()
    print(f"autoglm-fast demo: preset {preset!r}, eager reference, seeded random weights (seed {seed})")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    pixel_values = preprocess_images(demo_image(), config.vision)
    tone = demo_tone(config)
    input_features, num_samples = preprocess_audio([tone], config.audio)
    # No tokenizer yet: the nano vocabulary's first 256 ids stand for UTF-8 bytes.
    text_ids = list(prompt.encode("utf-8"))
    ids = build_prompt(config, text_ids, config.audio.num_tokens(num_samples[0]))
    print(f"request: image {tuple(pixel_values.shape[-2:])} -> {config.vision.num_tokens} tokens, "
          f"tone {len(tone) / config.audio.sampling_rate:.1f} s -> {config.audio.num_tokens(num_samples[0])} tokens, "
          f"text {len(text_ids)} tokens; prompt length {len(ids)}")

    result = greedy_generate(model, torch.tensor([ids]), max_new_tokens, pixel_values=pixel_values,
                             input_features=input_features, audio_num_samples=num_samples)
    tokens = result.tokens[0]
    for stage, seconds in result.timings.items():
        extra = f" ({1e3 * seconds / max(len(tokens) - 1, 1):.2f} ms/token)" if stage == "decode" else ""
        print(f"  {stage:<8} {1e3 * seconds:8.2f} ms{extra}")
    print(f"generated {len(tokens)} tokens: {tokens}")
    return tokens
