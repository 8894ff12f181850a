"""Tensor parallelism (issue 19): the engine on N ranks vs the same engine on one device (`bench
--tensor-parallel-size N ...`; no rows without it: a TP run needs N GPUs, or N CPU processes).

E2E rows "tp decode b1" and, with real shapes, "tp throughput b8 / b32" for the autoglm-phone-9b preset
(nano with --shapes small), towers dropped, CUDA graphs per rank; "vs one device" is the speedup over the
TP=1 engine (gpt-fast reports 1.61x at TP=2 on Llama-2-7B on A100s). The roofline is one rank's: the
weight bytes its decode step reads and its share of the KV cache (variants.py).
"""
from __future__ import annotations

from .common import Recorder
from .quant import PRESET
from .variants import compare_engines


def run(rec: Recorder) -> None:
    from autoglm_fast.engine import Engine
    opts = rec.opts
    if not opts.tensor_parallel:
        return
    preset = "nano" if opts.small else PRESET
    compare_engines(rec, "tp", preset, tuple(f"tp{n}" for n in opts.tensor_parallel), "one device",
                    lambda variant, sched: Engine.from_preset(
                        preset, dtype=opts.dtype, device=opts.device, scheduler=sched, backend="fast",
                        cuda_graphs=True, enable_prefix_caching=False, load_vision=False, load_audio=False,
                        tensor_parallel_size=1 if variant is None else int(variant[2:])))
