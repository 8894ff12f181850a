"""E2E rows comparing engine variants with one base engine of the same preset: weight-only int8 / int4 vs
unquantized (quant.py), N tensor-parallel ranks vs one device (parallel.py).

Per variant: "<prefix> decode b1" (the median decode step once one request decodes, e2e._decode_ms) and,
with real shapes, "<prefix> throughput b8 / b32" (ms per generated token of that many requests, prefill
included, e2e._ms_per_token). The base engine's time sits beside ours with the speedup, unless its CUDA
graphs fell back (an eager baseline would flatter ours). The roofline: the weight bytes one decode step
reads on a device as stored (runtime.decode_weight_bytes: a rank's share under tensor parallelism) plus
the KV cache it reads, per generated token. --shapes small: the nano preset at batch 1, 2 new tokens.
"""
from __future__ import annotations

from typing import Callable

import torch

from .common import NAN, Recorder, Row, with_engine
from .e2e import _decode_ms, _ms_per_token


def _timed(engine, batch: int, params, prompt: list[int]) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) ms: per decode step at batch 1, per generated token of `batch` requests above."""
    if batch == 1:
        return _decode_ms(engine, params, prompt)
    ms = _ms_per_token(engine, params, batch, prompt)
    return ms, ms, ms


def compare_engines(rec: Recorder, prefix: str, preset: str, variants: tuple, base: str,
                    build: Callable[[object, object], object]) -> None:
    """Rows for each variant: build(variant, scheduler) makes its engine, build(None, scheduler) the base one."""
    from autoglm_fast.engine import SamplingParams, SchedulerConfig

    opts = rec.opts
    new_tokens, prompt = (2, [7] * 8) if opts.small else (128, [7] * 32)
    label = f"{preset} {opts.dtype_name}"
    rows = {(v, b): Row("e2e", f"{prefix} decode b1" if b == 1 else f"{prefix} throughput b{b}", f"{label} {v}",
                        opts.dtype_name, {}, timer="engine")
            for b in ((1,) if opts.small else (1, 8, 32)) for v in variants}
    rows = {key: row for key, row in rows.items() if rec.selected(row.case, row.shape, headline=key[1] == 1)}
    batches = sorted({b for _, b in rows})
    if not batches:
        return
    sched = SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=2048, max_model_len=1024)
    greedy = SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True)
    baseline: dict[int, tuple[tuple[float, float, float], str]] = {}  # batch -> (times, CUDA-graph state)

    def measure(engine, variant):
        try:
            text = engine.config.text  # a rank's: its KV heads
            kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * engine.dtype.itemsize
            weights = engine.runtime.decode_weight_bytes()
            for b in batches:  # ascending: a time box that cuts the run keeps batch 1
                if variant is not None and (variant, b) not in rows:
                    continue
                times = _timed(engine, b, greedy, prompt)
                if variant is None:
                    baseline[b] = times, engine.graph_state.status
                    continue
                row = rows[(variant, b)]
                # one step reads the weights once and each sequence's KV so far, for b tokens
                row.bytes = (weights + b * kv * (len(prompt) + new_tokens // 2)) // b
                row.ms["ours"], row.quantiles["ours"] = times[0], times[1:]
                row.graphs["ours"] = engine.graph_state.status
                row.metrics.update({"tokens/s": 1e3 / times[0], "weight GB per step": weights / 1e9})
                if torch.cuda.is_available():
                    row.metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                _compare(row, baseline.get(b), base)
                rec.record(row)  # as it lands: a time box that cuts the run keeps it
        finally:
            engine.close()  # tensor-parallel workers stop with it

    for variant in (None,) + tuple(variants):
        mine = {key: row for key, row in rows.items() if variant in (None, key[0])}
        if not mine:
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        impl = base if variant is None else "ours"
        failed = Row("e2e", "", "", opts.dtype_name, {})  # the engine's error, for the rows it did not measure
        with_engine(failed, impl, lambda variant=variant: build(variant, sched),
                    lambda engine, variant=variant: measure(engine, variant))
        for (_, b), row in mine.items() if failed.errors else ():
            measured = b in baseline if variant is None else "ours" in row.ms
            if not measured:
                row.errors.setdefault(impl, failed.errors[impl])
                if variant is not None:
                    rec.record(row)


def _compare(row: Row, base, label: str) -> None:
    """The base engine's time beside ours and the speedup - not when its graphs fell back. No base: that
    engine failed, and its error is on the row already."""
    if base is None:
        return
    (med, lo, hi), status = base
    if status not in ("captured", "off"):  # "off": no CUDA, nothing to capture
        row.errors[label] = f"its CUDA graphs are {status!r}: an eager baseline, not compared"
        return
    row.ms[label], row.quantiles[label] = med, (lo, hi)
    row.metrics[f"{label} tokens/s"] = 1e3 / med
    row.metrics[f"speedup vs {label}"] = med / row.ms["ours"] if row.ms["ours"] > 0 else NAN
