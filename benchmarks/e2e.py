"""End to end through the engine: the full autoglm-phone-9b preset with seeded random weights.

Rows (`autoglm-fast bench --suite e2e`):
- decode b1: ms per token once a single request decodes, fast backend with and without CUDA graphs
  and the reference backend; the roofline is every decode-step weight read once (the embedding table
  is not: a step reads one row of it) - SPEC §4's 16.3 GB.
- ttft: one image + 5 s of audio + 64 text tokens to the first generated token; the roofline counts
  the backbone's matmuls over the prompt (encoders left out, so it is a lower bound).
- throughput b8 / b32: ms per generated token for that many requests at once (tokens/s in metrics).
- decode b1 at 4k / 32k context (fast backend, graphed): a prompt that long prefilled, then ms per
  decoded token; the roofline adds the KV cache one step reads to the weights. At 32k the prompt is
  32,639 tokens, so that the 128 decoded ones end inside the 9B's 32,768 RoPE positions.
Peak GPU memory of the fast engine goes in the decode row's metrics. --shapes small: the nano preset,
contexts of 24 and 48 tokens, a TTFT prompt of 1 s audio + 8 text, 8-token throughput prompts (the
interpreter takes seconds per token).
The prefix cache is off here: TTFT repeats one request, which would otherwise be served from the cache
(e2e_serving.py measures what the cache does).
Headline rows (--part headline): ours' decode b1, then at 4k and 32k context. --part rest measures the
others - and the short-context decode b1 again beside its baselines (a merge keeps the later row).
Each row's `graphs` holds the CUDA-graph state the graphed engine reported after it ran ("captured", or
"fallback" when capture failed and it decoded eagerly), never the setting that was asked for.
"""
from __future__ import annotations

import statistics
import time

import torch

from .common import NAN, Options, Recorder, Row, _why, free_cuda_memory, sync, with_engine


def _ttft(engine, request: dict, repeats: int, warmup: bool) -> tuple[float, int]:
    """Median ms from add_request to the first token, and the prompt's length in tokens."""
    times, prompt_tokens = [], 0
    for _ in range(repeats + warmup):  # a warm-up first: autotuning, the allocator's first blocks
        sync()
        start = time.perf_counter()
        rid = engine.add_request(**request)
        while not (outs := [o for o in engine.step() if o.request_id == rid and o.token_ids]):
            pass
        sync()
        times.append(time.perf_counter() - start)
        prompt_tokens = outs[0].prompt_tokens
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    return 1e3 * statistics.median(times[int(warmup):]), prompt_tokens


def _decode_ms(engine, params, prompt: str | list[int] = "benchmark") -> tuple[float, float, float]:
    """Median and 20/80 % step time once a single request is decoding."""
    rid, steps = engine.add_request(prompt, params), []
    while engine.has_unfinished():
        sync()
        t = time.perf_counter()
        outs = engine.step()
        sync()
        if any(o.request_id == rid and o.completion_tokens > 1 for o in outs):
            steps.append(1e3 * (time.perf_counter() - t))
    if not steps:
        return NAN, NAN, NAN
    q = statistics.quantiles(steps, n=10) if len(steps) > 1 else [steps[0]] * 9
    return statistics.median(steps), q[1], q[7]


def _ms_per_token(engine, params, batch: int, prompt: str) -> float:
    start = time.perf_counter()
    outs = engine.generate([prompt] * batch, params)
    sync()
    return 1e3 * (time.perf_counter() - start) / sum(o.completion_tokens for o in outs)


def _request(engine, seconds: float, text: int) -> tuple[dict, str]:
    from autoglm_fast.demo import demo_image, demo_tone
    from autoglm_fast.engine import SamplingParams
    try:
        images, what = [demo_image(224)], f"image + {seconds:g} s audio + {text} text"
    except ImportError:  # Pillow is an optional extra; the GPU check's image may lack it
        images, what = [], f"{seconds:g} s audio + {text} text (no Pillow: no image)"
    return dict(prompt="x " * (text // 2), params=SamplingParams.greedy(max_tokens=1), images=images,
                audio=[demo_tone(engine.config, seconds=seconds)]), what


def _long_context(rec: Recorder, preset: str, label: str, contexts, new_tokens: int) -> None:
    """decode b1 with `ctx` tokens already cached: weights plus the whole KV cache read every step. The
    sequence must end inside the RoPE table: at 32k (the 9B's max_position_embeddings) the prompt is
    new_tokens + 1 shorter."""
    from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
    from autoglm_fast.families import family_for_preset

    opts: Options = rec.opts
    max_len = family_for_preset(preset).preset(preset).text.max_position_embeddings
    for ctx in contexts:
        row = Row("e2e", "decode b1", f"{label}, {ctx // 1024 or ctx}{'k' if ctx >= 1024 else ''} context",
                  opts.dtype_name, {}, timer="engine")
        if not rec.selected(row.case, row.shape, headline=True):
            continue
        model_len = min(ctx + new_tokens + 1, max_len)
        prompt = model_len - new_tokens - 1
        sched = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=min(ctx, 8192), max_model_len=model_len)

        def measure(engine, row=row, prompt=prompt):
            text = engine.config.text
            kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * engine.dtype.itemsize
            weights = engine.model.parameter_counts()["backbone"] - engine.model.model.embed_tokens.weight.numel()
            row.bytes = weights * engine.dtype.itemsize + kv * (prompt + new_tokens // 2)
            row.metrics["prompt tokens"] = prompt
            params = SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True)
            med, lo, hi = _decode_ms(engine, params, prompt=[7] * prompt)
            row.ms["ours"], row.quantiles["ours"] = med, (lo, hi)
            row.graphs["ours"] = engine.graph_state.status

        with_engine(row, "ours", lambda: Engine.from_preset(
            preset, dtype=opts.dtype, device=opts.device, scheduler=sched, backend="fast", cuda_graphs=True,
            enable_prefix_caching=False, load_vision=False, load_audio=False), measure)
        rec.record(row)


def run(rec: Recorder) -> None:
    from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig

    opts: Options = rec.opts
    small = opts.small
    preset, new_tokens, repeats = ("nano", 3, 1) if small else ("autoglm-phone-9b", 128, 5)
    batches = (2,) if small else (8, 32)
    sched = SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=2048, max_model_len=1024)
    greedy = SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True)
    label = f"{preset} {opts.dtype_name}"
    decode = Row("e2e", "decode b1", label, opts.dtype_name, {}, timer="engine")
    ttft = Row("e2e", "ttft", label, opts.dtype_name, {}, timer="engine")
    throughput = {b: Row("e2e", f"throughput b{b}", label, opts.dtype_name, {}, timer="engine") for b in batches}

    def emit():  # after each measurement: a time box that cuts the run keeps what was measured
        for row in (decode, ttft, *throughput.values()):
            if row.ms or row.errors:
                rec.record(row)

    def measured(*rows):  # the graphed engine's rows say what it got: a fallback never reads as a graphed time
        for row in rows if graphs else ():
            row.graphs[impl] = engine.graph_state.status
        emit()

    variants = [("ours", "fast", True), ("ours, no graphs", "fast", False), ("reference", "reference", False)]
    if opts.compile_reference:
        variants.append(("reference+compile", "reference", False))
    headline_only = opts.part == "headline"
    for impl, backend, graphs in variants:
        # -k picks backends here; of this loop only ours' decode is a headline row
        if not rec.matches(impl, label) or (headline_only and impl != "ours"):
            continue
        engine = None
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            engine = Engine.from_preset(preset, backend=backend, dtype=opts.dtype, device=opts.device,
                                        scheduler=sched, cuda_graphs=graphs, enable_prefix_caching=False)
            if impl == "reference+compile":
                for layer in engine.model.model.layers:
                    layer.compile(mode=opts.compile_mode or "default")
            counts = engine.model.parameter_counts()
            per_step = counts["backbone"] - engine.model.model.embed_tokens.weight.numel()
            decode.bytes = ttft.bytes = per_step * engine.dtype.itemsize
            med, lo, hi = _decode_ms(engine, greedy)
            decode.ms[impl], decode.quantiles[impl] = med, (lo, hi)
            if impl == "ours" and torch.cuda.is_available():
                decode.metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            measured(decode)
            if impl == "ours, no graphs" or headline_only:
                continue  # TTFT and throughput take no graphs (prefill) or barely differ (batched decode)
            request, what = _request(engine, *((1.0, 8) if small else (5.0, 64)))
            ttft.ms[impl], prompt_tokens = _ttft(engine, request, repeats, warmup=not small)
            lm_head = engine.model.lm_head.weight.numel()  # prefill projects only the last position
            ttft.shape = f"{label}, {what} ({prompt_tokens} tokens)"
            ttft.flops = 2 * (per_step - lm_head) * prompt_tokens + 2 * lm_head
            measured(ttft)
            if backend == "reference" and not small:
                continue  # the reference runs requests one by one: batch 32 x 128 tokens would not fit the time
            for b, row in throughput.items():
                row.ms[impl] = _ms_per_token(engine, greedy, b, "x " * (4 if small else 32))
                row.metrics[f"{impl} tokens/s"] = 1e3 / row.ms[impl]
                measured(row)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for a baseline: record it, go on
            for row in (decode, ttft, *throughput.values()):
                row.errors.setdefault(impl, _why(e))
        finally:
            del engine
            free_cuda_memory()
        emit()
    _long_context(rec, preset, label, (24, 48) if small else (4096, 32768), new_tokens)
