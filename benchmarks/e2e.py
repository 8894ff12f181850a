"""End to end through the engine: the full autoglm-phone-9b preset with seeded random fp16 weights.

    python -m benchmarks.e2e [--json OUT] [--smoke] [--backend fast|reference]

Reports time to first token for one image + 5 s of audio + 64 text tokens, batch-1 decode ms/token
against the weight-bandwidth roofline (every backbone weight is read once per decode step), tokens/s
at batch 8 and 32, and peak GPU memory. --smoke: the nano preset on any device (checks the runner).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from .common import measure_ceilings


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ttft(engine, request: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        rid = engine.add_request(**request)
        while True:
            outs = [o for o in engine.step() if o.request_id == rid and o.token_ids]
            if outs:
                break
        _sync()
        times.append(time.perf_counter() - start)
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    return 1e3 * statistics.median(times)


def _decode_ms(engine, params, tokens: int) -> float:
    """Median step time once the single request is decoding."""
    rid, steps = engine.add_request("benchmark", params), []
    while engine.has_unfinished():
        _sync()
        t = time.perf_counter()
        outs = engine.step()
        _sync()
        if any(o.request_id == rid and o.completion_tokens > 1 for o in outs):
            steps.append(time.perf_counter() - t)
    return 1e3 * statistics.median(steps) if steps else math.nan


def _throughput(engine, params, batch: int) -> float:
    start = time.perf_counter()
    outs = engine.generate(["x " * 32] * batch, params)
    _sync()
    return sum(o.completion_tokens for o in outs) / (time.perf_counter() - start)


def run(smoke: bool, backend: str | None) -> dict:
    from autoglm_fast.demo import demo_image, demo_tone
    from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig

    preset, new_tokens = ("nano", 4) if smoke else ("autoglm-phone-9b", 128)
    sched = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=1024)
    engine = Engine.from_preset(preset, backend=backend, scheduler=sched)
    config = engine.config
    ceilings = measure_ceilings(smoke)
    weight_bytes = engine.model.parameter_counts()["backbone"] * engine.dtype.itemsize
    greedy = SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True)
    try:
        images, inputs = [demo_image(224)], "image + 5 s audio + 64 text tokens"
    except ImportError:  # Pillow is an optional extra; the GPU check's image may not have it
        images, inputs = [], "5 s audio + 64 text tokens (no Pillow: no image)"
    request = dict(prompt="x " * 32, params=SamplingParams.greedy(max_tokens=1), images=images,
                   audio=[demo_tone(config, seconds=5.0)])
    result = {"preset": preset, "backend": engine.backend, "device": ceilings.device, "dtype": str(engine.dtype),
              "torch": torch.__version__, "ceilings": ceilings.__dict__,
              "ttft_inputs": inputs, "ttft_ms": _ttft(engine, request, 1 if smoke else 5),
              "decode_ms_per_token": _decode_ms(engine, greedy, new_tokens)}
    result["decode_roofline_ms"] = weight_bytes / (ceilings.bandwidth_gbs * 1e9) * 1e3
    result["decode_roofline_pct"] = 100 * result["decode_roofline_ms"] / result["decode_ms_per_token"]
    for batch in (2,) if smoke else (8, 32):
        result[f"tokens_per_s_batch{batch}"] = _throughput(engine, greedy, batch)
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="the nano preset, any device")
    p.add_argument("--backend", choices=["fast", "reference"])
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks.e2e measures on a CUDA GPU; none here (use --smoke to exercise the runner)")
        return 0
    result = run(args.smoke, args.backend)
    for key, value in result.items():
        print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
