"""Serving patterns through the engine (fast backend, CUDA graphs where there is CUDA, prefix caching on):

    mixed arrivals  requests arrive as a Poisson process (seeded) with prompts and outputs of mixed
                    lengths, joining while others decode, as a server sees them: mixed steps, chunked
                    prefill and decode batches that grow and shrink. ms per generated token over the
                    whole run; tokens/s, TTFT p50 / p90 and the mean time per output token in metrics.
    mixed step      one step of decodes beside a prefill chunk through the fast backbone and lm_head, as
                    the engine runs it (piecewise graphs: attention eager between captured pieces), and
                    eager, against the same step replayed from one CUDA graph: the difference is the
                    host's overhead ("host overhead %" in metrics, for both). CPU runs time the
                    padded piecewise path and the eager one, without graphs.
    agent loop      5 steps of one conversation, each adding a screenshot and 100 text tokens after the
                    previous prompt and answer (all screenshots stay in the context): ms for the 5 steps,
                    with the prompt tokens prefilled and those taken from the prefix cache in metrics,
                    against the same loop with prefix caching off.

Big shapes: autoglm-phone-9b for mixed arrivals, glm-4.1v-9b (1080x2400 screenshots) for the agent loop.
--shapes small: nano and glm4v-tiny with short prompts (and short max_model_len), an agent loop of 2
steps (a CPU smoke run that measures nothing real).
"""
from __future__ import annotations

import random
import statistics
import time

import numpy as np
import torch

from .common import NAN, Options, Recorder, Row, sync, timed_ms, with_engine


def _arrivals(n: int, rate: float, prompt_lens, output_lens, seed: int = 0):
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choice(prompt_lens), rng.choice(output_lens)))
    return out


def mixed_arrivals(engine, arrivals, vocab: int) -> dict[str, float]:
    """Serve `arrivals` [(seconds, prompt tokens, output tokens)] in real time through engine.step()."""
    from autoglm_fast.engine import SamplingParams
    rng = np.random.default_rng(1)
    pending, added, first, finished, generated = list(arrivals), {}, {}, {}, 0
    sync()
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, n_in, n_out = pending.pop(0)
            ids = rng.integers(32, min(vocab, 256), n_in).tolist()  # plain byte-range tokens, no placeholders
            added[engine.add_request(ids, SamplingParams.greedy(max_tokens=n_out, ignore_eos=True))] = now
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for out in engine.step():
            t = time.perf_counter() - start
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = t
            if out.finished:
                finished[out.request_id] = (t, out.completion_tokens)
                generated += out.completion_tokens
    sync()
    total = time.perf_counter() - start
    ttft = sorted(first[r] - added[r] for r in first)
    tpot = [(t - first[r]) / (n - 1) for r, (t, n) in finished.items() if n > 1]
    q = statistics.quantiles(ttft, n=10) if len(ttft) > 1 else ttft * 9
    return {"ms per token": 1e3 * total / generated, "tokens/s": generated / total,
            "ttft p50 ms": 1e3 * statistics.median(ttft), "ttft p90 ms": 1e3 * q[8],
            "mean tpot ms": 1e3 * statistics.mean(tpot) if tpot else NAN, "requests": len(finished)}


def mixed_step(engine, decodes: int, context: int, chunk: int, reps: int) -> dict[str, float]:
    """Wall ms of one mixed step's forward as the engine runs it (piecewise graphs), eager, and (on CUDA)
    from one graph of the very same launches."""
    rt, cache, pieces = engine.runtime, engine.cache, engine.runner.pieces
    seqs = [f"decode {i}" for i in range(decodes)]
    cache.append(seqs, [context] * decodes)  # their K/V (never initialized: only the time matters)
    meta = cache.step(seqs + ["chunk"], [1] * decodes + [chunk])
    gen = torch.Generator(device=engine.device).manual_seed(0)
    embeds = 0.02 * torch.randn(decodes + chunk, rt.text.hidden_size, generator=gen, device=engine.device,
                                dtype=engine.dtype)
    caches, last = cache.layer_caches(meta), meta.query_start_loc[1:].long() - 1

    @torch.inference_mode()
    def eager():
        return rt.lm_head(rt.backbone(embeds[None], meta.positions[None], caches)[0, last])

    @torch.inference_mode()
    def piecewise():
        return rt.lm_head(pieces.run(meta, embeds)[last])

    out = {"piecewise": timed_ms(piecewise, reps), "eager": timed_ms(eager, reps)}
    if engine.device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        out["graph"] = timed_ms(graph.replay, reps)
        out["host overhead %"] = 100 * (1 - out["graph"] / out["piecewise"])
        out["eager host overhead %"] = 100 * (1 - out["graph"] / out["eager"])
    return out


def agent_loop(engine, screenshots, system_tokens: int, step_tokens: int, new_tokens: int) -> dict[str, float]:
    """One conversation, a step per screenshot: (prompt so far + answer) + screenshot + step_tokens."""
    from autoglm_fast.engine import SamplingParams
    c, proc = engine.config, engine.runtime.processor
    ids, images, prefilled, cached = [65 + i % 26 for i in range(system_tokens)], [], 0, 0
    sync()
    start = time.perf_counter()
    for k, shot in enumerate(screenshots):
        n = proc.num_image_tokens(proc.grid_for(shot.height, shot.width))
        ids += [c.image_start_token_id] + [c.image_token_id] * n + [c.image_end_token_id]
        ids += [97 + (k + i) % 26 for i in range(step_tokens)]
        images.append(shot)
        (out,) = engine.generate([ids], SamplingParams.greedy(max_tokens=new_tokens, ignore_eos=True), images=images)
        if out.error:
            raise RuntimeError(out.error)
        ids += out.token_ids
        prefilled += out.prompt_tokens - out.cached_tokens
        cached += out.cached_tokens
    sync()
    return {"ms": 1e3 * (time.perf_counter() - start), "prefilled tokens": prefilled, "cached tokens": cached,
            "final context": len(ids)}


def _screenshots(count: int, width: int, height: int):
    from PIL import Image
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def run(rec: Recorder) -> None:
    from autoglm_fast.engine import Engine, SchedulerConfig

    opts: Options = rec.opts
    small = opts.small
    # ---- mixed arrivals ------------------------------------------------------------------------------
    preset = "nano" if small else "autoglm-phone-9b"
    n, rate, prompt_lens, output_lens = ((3, 50.0, (4, 12), (1, 2)) if small
                                         else (32, 16.0, (64, 256, 1024, 2048), (32, 64, 128)))
    row = Row("e2e", "mixed arrivals", f"{preset} {opts.dtype_name}, {n} requests, Poisson {rate:g}/s",
              opts.dtype_name, {}, timer="engine")
    if rec.selected(row.case, row.shape):
        sched = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=256 if small else 4096)

        def arrivals(engine):
            stats = mixed_arrivals(engine, _arrivals(n, rate, prompt_lens, output_lens), engine.config.text.vocab_size)
            row.ms["ours"] = stats.pop("ms per token")
            row.metrics.update(stats)
            row.graphs["ours"] = engine.graph_state.status

        with_engine(row, "ours", lambda: Engine.from_preset(
            preset, dtype=opts.dtype, device=opts.device, scheduler=sched, backend="fast", cuda_graphs=True,
            load_vision=False, load_audio=False), arrivals)
        rec.record(row)
    # ---- a mixed step, eager against its CUDA graph ----------------------------------------------------------
    decodes, context, chunk = (2, 16, 6) if small else (16, 2048, 512)
    row = Row("e2e", "mixed step", f"{preset} {opts.dtype_name}, {decodes} decodes at {context} context + "
              f"{chunk}-token chunk", opts.dtype_name, {}, timer="engine")
    if rec.selected(row.case, row.shape):
        sched = SchedulerConfig(max_num_seqs=decodes + 1, max_num_batched_tokens=2048,
                                max_model_len=256 if small else 4096)

        def step(engine):
            stats = mixed_step(engine, decodes, context, chunk, reps=1 if small else 20)
            row.ms["ours"] = stats.pop("piecewise")
            row.ms["eager"] = stats.pop("eager")
            if "graph" in stats:
                row.ms["one CUDA graph"] = stats.pop("graph")
            row.metrics.update(stats)
            pieces = engine.runner.pieces  # what the piecewise graphs got
            row.graphs["ours"] = ("fallback" if pieces.failure else "captured" if pieces.graphs
                                  else "off" if not pieces.capture else "pending")
            rt = engine.runtime  # the matmuls, attention aside: lm_head projects one row per sequence
            head = rt.lm_head.weight.numel()
            row.flops = 2 * (rt.decode_weight_count() - head) * (decodes + chunk) + 2 * head * (decodes + 1)

        with_engine(row, "ours", lambda: Engine.from_preset(
            preset, dtype=opts.dtype, device=opts.device, scheduler=sched, backend="fast", cuda_graphs=True,
            load_vision=False, load_audio=False), step)
        rec.record(row)
    # ---- agent loop ----------------------------------------------------------------------------------
    preset, (w, h), system, step_tokens, new = (("glm4v-tiny", (56, 56), 24, 4, 1) if small
                                                else ("glm-4.1v-9b", (1080, 2400), 1500, 100, 32))
    dtype = torch.bfloat16 if torch.device(opts.device).type == "cuda" else opts.dtype
    dname = str(dtype).removeprefix("torch.")
    steps = 2 if small else 5  # small: the first prompt fills a KV block (32 tokens), which the second reuses
    row = Row("e2e", "agent loop", f"{preset} {dname}, {steps} steps of {w}x{h} + {step_tokens} tokens, {new} out",
              dname, {}, timer="engine")
    if not rec.selected(row.case, row.shape):
        return
    sched = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8192, max_model_len=1024 if small else 20480)
    for impl, caching in (("ours", True), ("ours, no prefix caching", False)):
        def loop(engine, impl=impl):
            stats = agent_loop(engine, _screenshots(steps, w, h), system, step_tokens, new)
            row.ms[impl] = stats.pop("ms")
            row.metrics.update({f"{impl}: {k}": v for k, v in stats.items()})
            if impl == "ours":
                row.graphs["ours"] = engine.graph_state.status

        with_engine(row, impl, lambda caching=caching: Engine.from_preset(
            preset, dtype=dtype, device=opts.device, scheduler=sched, backend="fast", cuda_graphs=True,
            enable_prefix_caching=caching, mm_processor_kwargs={"max_pixels": 5_000_000}), loop)
    rec.record(row)
