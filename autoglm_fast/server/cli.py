"""`autoglm-fast serve`: build the engine (backbone, vision and speech encoders, adapters), then the API.

vLLM compatibility: the flags of `python -m vllm.entrypoints.openai.api_server` that Open-AutoGLM's
command line uses are accepted with vLLM's meaning, and in either spelling (--max-model-len or
--max_model_len), as vLLM's FlexibleArgumentParser accepts both. vLLM engine tunings that have no
counterpart here (VLLM_NO_OP_FLAGS) are accepted with a one-line warning on stderr each and listed in
`args.ignored_vllm_flags`. --tensor-parallel-size / -tp is real (parallel/): N ranks, and a worker that dies
ends the server with status 1 and a message naming its rank.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys

# vLLM engine options with no effect here: flag -> the type of its value (None: a switch)
VLLM_NO_OP_FLAGS = {"--mm-encoder-tp-mode": str, "--mm-processor-cache-type": str, "--gpu-memory-utilization": float,
                    "--trust-remote-code": None, "--enforce-eager": None}
DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
          "float32": "float32"}  # vLLM's --dtype spellings -> ours
DEFAULT_MAX_IMAGES = 8
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}


def _mebibytes(text: str) -> int:
    size = float(text) * 2**20
    if not 1 <= size < 2**63:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {text}")
    return int(size)


def _model_len(text: str) -> int:
    """A positive token count; vLLM's human-readable forms too: 25k = 25000, 32K = 32768."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", text.strip())
    n = float(m[1]) * _SUFFIXES[m[2]] if m else 0
    if n < 1 or n != int(n):
        raise argparse.ArgumentTypeError(f"must be a positive number of tokens (e.g. 25480, 25k, 32K), got {text!r}")
    return int(n)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"image\": 10}}', got {text!r}")
    return value


def _mm_limits(text: str) -> dict:
    limits = _json_object(text)
    for modality, count in limits.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise argparse.ArgumentTypeError(f"{modality!r} must map to a count >= 0, got {count!r} in {text!r}")
    return limits


def _content_format(text: str) -> str:
    return "openai" if text == "auto" else text  # vLLM's "auto" finds GLM-4.1V's template iterating parts


class _MmLimits(argparse.Action):
    """--limit-mm-per-prompt: modalities it names replace the current limits; "image" is --max-images."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.limit_mm_per_prompt = {**namespace.limit_mm_per_prompt, **values}
        namespace.max_images = namespace.limit_mm_per_prompt["image"]


class _MaxImages(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.max_images = values
        namespace.limit_mm_per_prompt = {**namespace.limit_mm_per_prompt, "image": values}


class _NoOp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        shown = option_string if self.nargs == 0 else f"{option_string} {values}"
        print(f"WARNING: {shown}: a vLLM engine option with no effect in autoglm-fast; ignored", file=sys.stderr)
        namespace.ignored_vllm_flags = [*namespace.ignored_vllm_flags, option_string]


def _flag(p, *names: str, **kwargs):
    """p.add_argument, plus hidden underscore spellings of the long names (vLLM's parser takes both)."""
    action = p.add_argument(*names, **kwargs)
    twins = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
    if twins:
        hidden = {k: v for k, v in kwargs.items() if k not in ("help", "default", "dest", "metavar")}
        p.add_argument(*twins, dest=action.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..generate_cli import add_model_arguments, positive_int
    add_model_arguments(p)  # --model / --preset / --tokenizer / --quantization / --tensor-parallel-size
    p.add_argument("--tensor_parallel_size", dest="tensor_parallel_size", type=positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # vLLM's underscore spelling
    _flag(p, "--host", default="0.0.0.0")
    _flag(p, "--port", type=int, default=8000)
    _flag(p, "--served-model-name", default="autoglm-phone-9b")
    _flag(p, "--api-key", help="require Authorization: Bearer KEY (/health stays open)")
    _flag(p, "--allowed-local-media-path", metavar="DIR",
          help="allow image_url parts naming local files (or file:// URLs) under DIR")
    _flag(p, "--max-concurrency", type=int, default=32, help="requests batched in one engine step")
    _flag(p, "--max-queued", type=int, default=256, help="requests in flight beyond which new ones get 429")
    _flag(p, "--max-model-len", type=_model_len, default=4096, help="tokens per sequence, prompt + output "
          "(vLLM's forms too: 25k, 32K)")
    _flag(p, "--max-images", type=int, default=DEFAULT_MAX_IMAGES, action=_MaxImages,
          help="images per request (same as --limit-mm-per-prompt '{\"image\": N}')")
    _flag(p, "--max-body-mb", type=_mebibytes, default="64", dest="max_body_bytes", metavar="MB",
          help="request bodies over MB MiB get 413, before any decoding (default: 64)")
    _flag(p, "--reasoning-format", choices=["separate", "inline"], default="separate",
          help="reasoning as reasoning_content (separate) or kept as <think>...</think> in content")
    _flag(p, "--backend", choices=["fast", "reference"], help="default: fast where the kernels can run")
    _flag(p, "--device", help="default: cuda if available, else cpu")
    _flag(p, "--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
          help="prefill every prompt in full (default: reuse the KV blocks of earlier identical prefixes, "
               "media included; the fast backend only)")
    v = p.add_argument_group("vLLM-compatible options", "accepted with vLLM's meaning; dashes or underscores")
    _flag(v, "--dtype", type=lambda s: DTYPES.get(s, s), choices=sorted(set(DTYPES.values())), default="auto",
          help="weights and activations (auto: the checkpoint's own, half = float16, float = float32)")
    _flag(v, "--limit-mm-per-prompt", type=_mm_limits, action=_MmLimits, default={"image": DEFAULT_MAX_IMAGES},
          metavar="JSON", help="media items per request by modality, e.g. '{\"image\": 10}'")
    _flag(v, "--mm-processor-kwargs", type=_json_object, metavar="JSON",
          help="image processor overrides, e.g. '{\"max_pixels\": 5000000}'")
    _flag(v, "--chat-template-content-format", type=_content_format, choices=["openai", "string"],
          default="openai", help="openai: list contents reach the chat template as parts; string: flattened "
          "to one string first (images' placeholders in front, parts joined by newlines), as vLLM does; "
          "auto: openai, what vLLM picks for GLM-4.1V's template")
    _flag(v, "--reasoning-parser", choices=["glm45", "none"], default="none",
          help="glm45: <think>...</think> goes to reasoning_content, as vLLM's; none: the text stays in content")
    _flag(v, "--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
          help="on by default (the fast backend); an error with --backend reference")
    _flag(v, "--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
          help="same as --no-prefix-caching")
    p.set_defaults(ignored_vllm_flags=[], enable_prefix_caching=None)
    for flag, kind in VLLM_NO_OP_FLAGS.items():
        extra = {"nargs": 0} if kind is None else {"type": kind, "metavar": "X"}
        _flag(v, flag, action=_NoOp, default=argparse.SUPPRESS, help="no effect here (a vLLM engine option)", **extra)


def run(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from ..engine import SchedulerConfig
    from ..generate_cli import load_engine
    from .app import create_app
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log = logging.getLogger("autoglm_fast.server")
    for flag in getattr(args, "ignored_vllm_flags", None) or ():
        log.warning("%s is a vLLM option with no effect here", flag)
    sched = SchedulerConfig(max_num_seqs=args.max_concurrency, max_model_len=args.max_model_len,
                            max_num_batched_tokens=max(2048, args.max_concurrency))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)  # auto: the checkpoint's (bf16 / fp16)
    kw = dict(device=args.device, backend=args.backend, scheduler=sched, dtype=dtype,
              enable_prefix_caching=args.enable_prefix_caching)
    # the family's request options, only where given (a family that has none says so)
    if args.mm_processor_kwargs:
        kw["mm_processor_kwargs"] = args.mm_processor_kwargs
    if args.chat_template_content_format != "openai":
        kw["content_format"] = args.chat_template_content_format
    engine = load_engine(args, **kw)
    if engine.driver is not None:  # a dead worker cannot be replaced: end the server, naming it
        engine.driver.exit_on_failure = True
    reasoning_parser = None if args.reasoning_parser in (None, "none") else args.reasoning_parser
    app = create_app(engine, args.served_model_name, args.api_key, args.allowed_local_media_path,
                     args.max_queued, args.max_images, args.reasoning_format,
                     max_body_bytes=args.max_body_bytes, reasoning_parser=reasoning_parser)
    ranks = f", tensor parallel x {engine.parallel.size}" if engine.parallel else ""
    log.info("Model loaded successfully (%s backend on %s%s)", engine.backend, engine.device, ranks)
    sys.stderr.flush()
    uvicorn.run(app, host=args.host, port=args.port)
