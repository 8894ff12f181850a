"""The nano checkpoint's training recipe: tokenizer, vision pretraining, then the whole model end to end.

    python -m autoglm_fast.train --out checkpoints/autoglm-phone-nano

Seeded throughout (data streams, initial weights, batch order, dropout); ~8 minutes on 2 idle CPU cores.
Floating-point sums differ across CPUs, so a rerun elsewhere lands on slightly different weights but
the same accuracy bar (the held-out check at the end says which tasks pass it).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..reference.model import AutoGLMPhoneForCausalLM
from . import data
from .pretrain import pretrain_vision
from .tokenizer import build_nano_tokenizer
from .train import IGNORE, make_batch, make_model, train_step


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05     # cosine decay ends at lr * this
    warmup: int = 100
    weight_decay: float = 0.01
    pool: int = 8000               # training examples generated up front and sampled with replacement
    pretrain_steps: int = 400      # vision-tower probe steps (stage 1)
    freeze_vision_tower: bool = True  # in stage 2, as LLaVA keeps CLIP frozen (else shape features wash out)
    image_token_dropout: float = 0.9  # rows that see vision only through the gate (train.loss_fn)
    heldout: int = 400
    eval_every: int = 400
    seed: int = 0
    threads: int = 2


def lr_lambda(recipe: Recipe):
    def scale(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return scale


@torch.no_grad()
def teacher_forced_accuracy(model: AutoGLMPhoneForCausalLM, examples: list[dict], tokenizer, config,
                            batch_size: int = 50) -> dict[str, float]:
    """Per task, the share of examples whose every answer token (and the end token) is the argmax.
    A quick training-time check; `eval.py` decodes for real through the engine."""
    was_training = model.training
    model.eval()
    hits = collections.defaultdict(list)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = make_batch(chunk, tokenizer, config)
        pred = model(batch.input_ids, **batch.model_inputs()).logits.argmax(-1)
        ok = ((pred == batch.labels) | (batch.labels == IGNORE)).all(1)
        for ex, good in zip(chunk, ok.tolist()):
            hits[ex["task"]].append(good)
    model.train(was_training)
    return {task: sum(v) / len(v) for task, v in hits.items()}


def train_nano(out_dir: str | Path, recipe: Recipe = Recipe(), log=print) -> dict:
    """Train and save the checkpoint (config.json, safetensors, tokenizer.json, training.json) to out_dir."""
    out = Path(out_dir)
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    tokenizer, config = build_nano_tokenizer(out)  # writes out/tokenizer.json
    model = make_model(config, seed=recipe.seed)
    probe = pretrain_vision(model, steps=recipe.pretrain_steps, seed=recipe.seed)
    log(f"stage 1, vision tower probe ({recipe.pretrain_steps} steps): held-out "
        + ", ".join(f"{k} {v:.0%}" for k, v in probe.items()))

    pool = list(data.examples("train", recipe.pool, seed=recipe.seed))
    heldout = list(data.examples("heldout", recipe.heldout, seed=recipe.seed))
    if recipe.freeze_vision_tower:
        model.vision_tower.requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name or name.endswith(".ln.weight") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe))
    order = torch.Generator().manual_seed(recipe.seed)
    dropout = torch.Generator().manual_seed(recipe.seed + 1)
    history = []
    for step in range(1, recipe.steps + 1):
        idx = torch.randint(0, len(pool), (recipe.batch_size,), generator=order).tolist()
        loss = train_step(model, opt, make_batch([pool[i] for i in idx], tokenizer, config),
                          image_token_dropout=recipe.image_token_dropout, generator=dropout)
        sched.step()
        if step % recipe.eval_every == 0 or step == recipe.steps:
            acc = teacher_forced_accuracy(model, heldout, tokenizer, config)
            history.append({"step": step, "loss": round(loss, 4), "seconds": round(time.perf_counter() - start),
                            "heldout": {k: round(v, 4) for k, v in acc.items()}})
            log(f"step {step:5d}  loss {loss:.3f}  {history[-1]['seconds']:4d} s  "
                + " ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    model.eval()
    model.save_pretrained(out)
    report = {"recipe": dataclasses.asdict(recipe), "vision_probe": probe, "history": history,
              "seconds": round(time.perf_counter() - start), "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
