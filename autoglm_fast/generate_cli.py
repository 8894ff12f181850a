"""`autoglm-fast generate`: stream one answer to the terminal, then time to first token and tokens/s."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --preset / --tokenizer / --quantization / --tensor-parallel-size (also `serve`'s)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory (config.json + safetensors + tokenizer.json); "
                     "default: the shipped, trained checkpoints/autoglm-phone-nano")
    src.add_argument("--preset", help="a preset with seeded random weights and the byte tokenizer instead "
                     "(nano, autoglm-phone-9b, glm-4.1v-9b, glm4v-tiny)")
    p.add_argument("--tokenizer", metavar="PATH|bytes",
                   help="a tokenizer.json (or a directory holding one), or 'bytes' for the built-in byte "
                        "tokenizer; default: the checkpoint's own (a checkpoint without one is an error)")
    add_quantization_arguments(p)
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="split the decoder over N devices (GPUs 0..N-1 with NCCL, or N CPU processes with gloo); "
                        "each rank loads only its shard. Default: 1")


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_quantization_arguments(p: argparse.ArgumentParser) -> None:
    """--quantization / --quantize-vision (generate, serve, info; bench has its own --quantization)."""
    p.add_argument("--quantization", "-q", choices=["int8", "int4", "awq"],
                   help="weight-only quantization at load, round to nearest: the decoder's linears in int8 or int4 "
                        "(groups of 128), lm_head in int8. awq: the checkpoint is AWQ 4-bit (it loads so without "
                        "the flag; vLLM's spelling). Default: the checkpoint's own precision")
    p.add_argument("--quantize-vision", action="store_true",
                   help="quantize the vision / audio towers too (default: they stay in the activation dtype)")


def quantization_options(args: argparse.Namespace) -> dict:
    """Engine keyword arguments for --quantization / --quantize-vision ('awq' asks only that the checkpoint
    be AWQ: the engine reads that from its config.json)."""
    method = getattr(args, "quantization", None)
    if method == "awq":
        from .quant.awq import checkpoint_awq_settings
        model = getattr(args, "model", None)
        if getattr(args, "preset", None) or not model or checkpoint_awq_settings(model) is None:
            raise ValueError("--quantization awq needs --model DIR of an AWQ checkpoint (quantization_config in its "
                             "config.json); quantize any other checkpoint with --quantization int8 or int4")
        method = None
    return {"quantization": method, "quantize_vision": getattr(args, "quantize_vision", False)}


def load_engine(args: argparse.Namespace, **kwargs):
    from .engine import Engine
    kwargs.update(quantization_options(args), tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))
    if args.preset:
        return Engine.from_preset(args.preset, tokenizer=args.tokenizer, **kwargs)
    from .train.eval import default_checkpoint
    return Engine.from_pretrained(args.model or default_checkpoint(), tokenizer=args.tokenizer, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", help="system message")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="WAV file (repeatable)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-thinking", action="store_true", help="skip the <think> block")
    p.add_argument("--backend", choices=["fast", "reference"], help="default: fast where the kernels can run")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"])


def run(args: argparse.Namespace) -> None:
    from .engine import SamplingParams
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    engine = load_engine(args, dtype=dtype, device=args.device, backend=args.backend)
    load_s = time.perf_counter() - t0
    content = ([{"type": "image", "image": p} for p in args.image] + [{"type": "audio", "audio": p} for p in args.audio]
               + [{"type": "text", "text": args.prompt}])
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    ranks = f" x {engine.parallel.size} ranks" if engine.parallel else ""
    print(f"[{engine.backend} backend on {engine.device}{ranks}, {engine.dtype}; loaded in {load_s:.1f} s]",
          file=sys.stderr)
    start, first, last = time.perf_counter(), None, None
    try:
        for out in engine.stream(messages=messages, params=params, enable_thinking=not args.no_thinking):
            if first is None and out.token_ids:
                first = time.perf_counter()
            print(out.text, end="", flush=True)
            last = out
    finally:
        engine.close()
    end = time.perf_counter()
    print()
    n = last.completion_tokens if last else 0
    ttft = (first or end) - start
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else float("nan")
    print(f"[{last.prompt_tokens} prompt tokens, {n} generated ({last.finish_reason}); "
          f"time to first token {1e3 * ttft:.0f} ms, {rate:.1f} tokens/s]", file=sys.stderr)
    if last.error:
        raise ValueError(last.error)
