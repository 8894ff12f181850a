"""Held-out accuracy of a nano checkpoint, per task, decoded for real through the engine.

    python -m autoglm_fast.train.eval [--model DIR] [--n 160] [--backend both]
    autoglm-fast eval ...

Examples come from the held-out seed stream (never trained on). An answer counts when the greedy
completion is exactly the target text followed by the end-of-turn token (the reasoning block too,
for chat turns with thinking on).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

from . import data

BACKENDS = ("reference", "fast")
VISION_TASKS, AUDIO_TASKS = ("colour", "shape", "position"), ("beeps", "pitch")


def default_checkpoint() -> Path:
    """The shipped `checkpoints/autoglm-phone-nano` (the repository's, or the installed package's copy)."""
    repo = Path(__file__).resolve().parents[2] / "checkpoints" / "autoglm-phone-nano"
    if repo.is_dir():
        return repo
    from importlib.resources import files
    return Path(str(files("autoglm_fast.checkpoints") / "autoglm-phone-nano"))


def answer(engine, examples: list[dict], max_tokens: int = 64) -> list[list[int]]:
    """Greedy completions (token ids, without the stop token) for every example, batched by the engine."""
    from ..engine import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    ids = [engine.add_request(messages=ex["messages"], params=params, enable_thinking=ex["enable_thinking"])
           for ex in examples]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    eos = set(engine.tokenizer.eos_token_ids)
    return [[t for t in tokens[i] if t not in eos] for i in ids]


def target_ids(engine, example: dict) -> list[int]:
    return engine.tokenizer.encode(data.target_text(example), allow_special=True)


def evaluate(engine, examples: list[dict]) -> tuple[dict[str, float], list[list[int]]]:
    """(accuracy per task, the completions)."""
    completions = answer(engine, examples)
    hits = collections.defaultdict(list)
    for ex, got in zip(examples, completions):
        hits[ex["task"]].append(got == target_ids(engine, ex))
    return {task: sum(v) / len(v) for task, v in hits.items()}, completions


def heldout(n: int, seed: int = 0, tasks: tuple[str, ...] = data.TASKS) -> list[dict]:
    """n held-out examples of `tasks` (drawn from the cycling stream, so each task gets ~n/len(tasks))."""
    out = []
    for ex in data.examples("heldout", n * len(data.TASKS), seed):
        if ex["task"] in tasks:
            out.append(ex)
            if len(out) == n:
                break
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped nano)")
    p.add_argument("--n", type=int, default=160, help="held-out examples (spread over the tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS + ("both",), default="both")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    import torch

    from ..engine import Engine
    from ..kernels.utils import device_supported
    model = Path(args.model) if args.model else default_checkpoint()
    examples = heldout(args.n, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = BACKENDS if args.backend == "both" else (args.backend,)
    if "fast" in backends and not device_supported(device):
        if args.backend == "fast":
            raise ValueError("the fast backend needs a CUDA GPU or TRITON_INTERPRET=1 (Triton's interpreter) on CPU")
        print("fast backend skipped: no CUDA GPU and TRITON_INTERPRET is not set", file=sys.stderr)
        backends = ("reference",)
    results = {}
    for backend in backends:
        engine = Engine.from_pretrained(model, backend=backend, device=device)
        results[backend] = evaluate(engine, examples)
    tasks = list(dict.fromkeys(ex["task"] for ex in examples))
    print(f"{model}: {len(examples)} held-out examples (seed {args.seed})")
    print(f"{'task':<10}{'n':>5}" + "".join(f"{b:>12}" for b in backends))
    for task in tasks:
        n = sum(ex["task"] == task for ex in examples)
        print(f"{task:<10}{n:>5}" + "".join(f"{results[b][0][task]:>12.1%}" for b in backends))
    if len(backends) == 2:
        same = sum(a == b for a, b in zip(results["reference"][1], results["fast"][1]))
        print(f"reference and fast give the same completion on {same}/{len(examples)} examples")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoglm_fast.train.eval", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
