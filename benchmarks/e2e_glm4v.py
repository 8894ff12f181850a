"""End to end for the released model (GLM-4.1V, preset glm-4.1v-9b, seeded random bf16 weights): one
Open-AutoGLM agent step through the engine.

    agent step ttft   a 1080x2400 screenshot (max_pixels 5 M: 3,108 image tokens) + a 1,500-token system
                      prompt + a short instruction, to the first token; metrics split it into image
                      preprocessing, the vision tower and the LLM prefill (the rest)
    decode b1         ms per token at that context; roofline: 8,779,522,048 decoder + lm_head parameters
                      (the embedding table aside) plus the KV cache, read once per token
    agent step        the whole step, 250 generated tokens

Each run sends a new screenshot, and a text prompt puts it first: nothing comes from the prefix cache,
so this is a cold agent step (the agent loop in e2e_serving.py measures warm ones). --shapes small: the glm4v-tiny preset with a 112x168
screenshot, 32 system tokens and 4 generated tokens (a CPU smoke run).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .common import NAN, Options, Recorder, Row, _why, free_cuda_memory, sync


def _screenshot(width: int, height: int, seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, 1e3 * (time.perf_counter() - start)


def run(rec: Recorder) -> None:
    from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig

    opts: Options = rec.opts
    small = opts.small
    preset, (w, h), system, new = (("glm4v-tiny", (112, 168), 32, 4) if small
                                   else ("glm-4.1v-9b", (1080, 2400), 1500, 250))
    dtype = torch.bfloat16 if torch.device(opts.device).type == "cuda" else opts.dtype
    dname = str(dtype).removeprefix("torch.")
    label = f"{preset} {dname}"
    ttft = Row("e2e", "agent step ttft", label, dname, {}, timer="engine")
    decode = Row("e2e", "decode b1", f"{label}, agent step context", dname, {}, timer="engine")
    step = Row("e2e", "agent step", f"{label}, {new} tokens", dname, {}, timer="engine")
    if not rec.selected("agent step", label):
        return
    engine = None
    try:
        sched = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8192, max_model_len=8192)
        engine = Engine.from_preset(preset, dtype=dtype, device=opts.device, scheduler=sched,
                                    mm_processor_kwargs={"max_pixels": 5_000_000})
        rt, image = engine.runtime, _screenshot(w, h)
        prompt = "x" * system + " open the settings app"  # the byte tokenizer: one token per character
        media, pre_ms = _timed(lambda: rt.processor.preprocess([image]))
        pv, grid = (t.to(engine.device) for t in media)
        with torch.inference_mode():
            _timed(lambda: rt.model.encode_images(pv, grid))  # warm-up: kernels compile, cuBLAS picks
            _, vision_ms = _timed(lambda: rt.model.encode_images(pv, grid))
        params = SamplingParams.greedy(max_tokens=new, ignore_eos=True)
        for attempt in range(1 if small else 2):  # the first run warms up the prefill and decode paths
            times, start = [], time.perf_counter()
            shot = image if attempt == 0 else _screenshot(w, h, seed=attempt)  # same size: same token count
            rid = engine.add_request(prompt, params, images=[shot])
            first = last = None
            while engine.has_unfinished():
                sync()
                t = time.perf_counter()
                outs = [o for o in engine.step() if o.request_id == rid]
                sync()
                if outs and outs[-1].token_ids:
                    if first is None:
                        first = time.perf_counter() - start
                    elif outs[-1].completion_tokens > 1:
                        times.append(1e3 * (time.perf_counter() - t))
                    last = outs[-1]
            total = time.perf_counter() - start
        tokens = last.prompt_tokens
        ttft.ms["ours"] = 1e3 * first
        ttft.shape = f"{label}, {w}x{h} screenshot + {system} system tokens ({tokens} prompt tokens)"
        ttft.metrics.update({"cached prompt tokens": last.cached_tokens, "image preprocessing ms": pre_ms,
                             "vision tower ms": vision_ms,
                             "LLM prefill ms (the rest)": ttft.ms["ours"] - pre_ms - vision_ms})
        weights = rt.decode_weight_count()
        ttft.flops = 2 * (weights - rt.lm_head.weight.numel()) * tokens
        kv = rt.text.kv_cache_bytes_per_token(torch.tensor([], dtype=dtype).element_size())
        decode.bytes = weights * engine.dtype.itemsize + kv * (tokens + new // 2)
        decode.ms["ours"] = statistics.median(times) if times else NAN
        decode.graphs["ours"] = ttft.graphs["ours"] = step.graphs["ours"] = engine.graph_state.status
        decode.metrics["decode parameters"] = weights
        step.ms["ours"] = 1e3 * total
        step.metrics["tokens/s after the first"] = (new - 1) / (total - first) if total > first else NAN
    except Exception as e:  # noqa: BLE001 - out of memory, no Pillow: record it, go on
        for row in (ttft, decode, step):
            row.errors.setdefault("ours", _why(e))
    finally:
        del engine
        free_cuda_memory()
    for row in (ttft, decode, step):
        rec.record(row)
