"""`autoglm-fast` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from .families import family_for_checkpoint, family_for_preset
    from .generate_cli import quantization_options
    from .quant.memory import memory_report
    if args.model:
        family = family_for_checkpoint(args.model)
        config, source = family.load_config(args.model), {"model": args.model}
    else:
        family = family_for_preset(args.preset)
        config, source = family.preset(args.preset), {"preset": args.preset}
    from .parallel.sharding import TensorParallel
    from .quant.awq import checkpoint_awq_settings
    from .quant.quantize import resolve
    from .weights import meta_model
    dtype, quant = getattr(torch, args.dtype), quantization_options(args)
    # sizes without allocating 9 B parameters; with -tp N, rank 0's (the largest) shard: per GPU
    tp = TensorParallel(0, args.tensor_parallel_size) if args.tensor_parallel_size > 1 else None
    awq = checkpoint_awq_settings(args.model) if args.model else None
    model = meta_model(family.model_cls, config, tp, resolve(**quant), awq)[0].to(dtype)
    memory = memory_report(model, dtype, args.model, **quant)
    per_gpu = {"tensor_parallel_size": tp.size, "sizes_are": "per GPU (rank 0)"} if tp else {}
    print(json.dumps({**source, "family": family.name, **per_gpu, "parameters": model.parameter_counts(),
                      "memory": memory, "config": dataclasses.asdict(config)}, indent=2))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo, write_media
    if args.write_media:
        print(" ".join(write_media(args.write_media, args.model)))
    else:
        run_demo(args.model, args.backend, args.max_tokens)


def _eval(args: argparse.Namespace) -> int:
    from .train.eval import run
    return run(args)


def _generate(args: argparse.Namespace) -> None:
    from .generate_cli import run
    run(args)


def _serve(args: argparse.Namespace) -> None:
    from .server.cli import run
    run(args)


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks.suite import run_cli
    return run_cli(args)


def main(argv: list[str] | None = None) -> int:
    from .generate_cli import add_arguments
    parser = argparse.ArgumentParser(prog="autoglm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="stream an answer (text, --image, --audio) from the engine")
    add_arguments(p)
    p.set_defaults(func=_generate)
    p = sub.add_parser("demo", help="the shipped nano checkpoint answers a vision, an audio and a text question")
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: checkpoints/autoglm-phone-nano)")
    p.add_argument("--backend", choices=["fast", "reference"], help="default: fast where the kernels can run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--write-media", metavar="DIR", help="only write the demo's image and clip (PNG, WAV) to DIR")
    p.set_defaults(func=_demo)
    p = sub.add_parser("eval", help="held-out accuracy per task of a nano checkpoint, both backends")
    from .train.eval import add_arguments as add_eval_arguments
    add_eval_arguments(p)
    p.set_defaults(func=_eval)
    p = sub.add_parser("serve", help="the OpenAI-compatible API (FastAPI + uvicorn) on --host:--port")
    from .server.cli import add_arguments as add_serve_arguments
    add_serve_arguments(p)
    p.set_defaults(func=_serve)
    p = sub.add_parser("bench", help="kernel and end-to-end benchmarks: ours vs eager vs torch.compile, "
                                     "%% of the measured roofline; JSON, Markdown, plots, --compare")
    from .benchmarks.suite import add_arguments as add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=_bench)
    p = sub.add_parser("info", help="print a preset's or a checkpoint's config, parameter counts and weight bytes "
                                    "per part (quantized with --quantization), and the KV tokens that fit per card")
    p.add_argument("--preset", default="autoglm-phone-9b", help="autoglm-phone-9b, nano, glm-4.1v-9b, glm4v-tiny")
    p.add_argument("--model", metavar="DIR", help="a checkpoint directory (its config.json picks the family)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="the activations' dtype (what unquantized weights are stored in)")
    from .generate_cli import add_quantization_arguments, positive_int
    add_quantization_arguments(p)
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="sizes per GPU of N tensor-parallel ranks (rank 0's shard; the KV cache of its heads)")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError) as e:
        print(f"autoglm-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
