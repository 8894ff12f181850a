"""Stage 1: the vision tower learns to see before the language model learns to read it.

The article's vision tower is a pretrained CLIP; ours starts random. Trained end to end from random
weights, the nano model learns colour and position (a random patch embedding already separates
them) but shape stays at chance: the language model cannot ask for a feature the tower does not yet
have, and the tower gets no useful gradient until it is asked (measured: 33 % after 600 shape-only
steps, 36 % after 2000 mixed steps). So, as CLIP is pretrained on its own objective, the tower is
first trained for a few hundred steps with a throwaway linear probe that names the shape, colour and
position of generated images; after that the full model reads shape in ~100 steps.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..reference.image_processing import preprocess_images
from ..reference.model import AutoGLMPhoneForCausalLM
from . import data

HEADS = (("shape", data.SHAPES), ("colour", tuple(data.COLOURS)), ("position", tuple(data.POSITIONS)))


def labelled_images(n: int, image_size: int, vision_config, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n preprocessed images of the synthetic tasks and their [n, 3] (shape, colour, position) labels."""
    rng = np.random.default_rng([seed, 2])  # a stream of its own: never the train or held-out examples
    labels = [[int(rng.integers(len(values))) for _, values in HEADS] for _ in range(n)]
    images = [data.make_image(*(values[i] for (_, values), i in zip(HEADS, row)), image_size, rng) for row in labels]
    return preprocess_images(images, vision_config), torch.tensor(labels)


def pretrain_vision(model: AutoGLMPhoneForCausalLM, steps: int = 400, batch_size: int = 64, lr: float = 2e-3,
                    num_images: int = 4000, seed: int = 0) -> dict[str, float]:
    """Train model.vision_tower (only) with a linear probe on the mean of its output tokens; the probe
    is discarded. The mean, like the gated fusion's vision summary v: what the probe reads, v carries.
    Returns the probe's accuracy per label on 500 images it never trained on."""
    cfg = model.config.vision
    pixels, labels = labelled_images(num_images + 500, data.IMAGE_SIZE, cfg, seed)
    tower = model.vision_tower
    sizes = [len(values) for _, values in HEADS]
    probe = torch.nn.Linear(cfg.hidden_size, sum(sizes))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(probe.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def per_head(x: torch.Tensor) -> list[torch.Tensor]:
        return list(probe(tower(x).mean(1)).split(sizes, dim=-1))

    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, num_images, (batch_size,), generator=gen)
        loss = sum(F.cross_entropy(z, labels[idx, k]) for k, z in enumerate(per_head(pixels[idx])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = per_head(pixels[num_images:])
    return {name: float((z.argmax(-1) == labels[num_images:, k]).float().mean())
            for k, ((name, _), z) in enumerate(zip(HEADS, logits))}
