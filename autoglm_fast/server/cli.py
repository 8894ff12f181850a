"""`autoglm-fast serve`: build the engine (backbone, vision and speech encoders, adapters), then the API."""
from __future__ import annotations

import argparse
import logging
import sys


def _mebibytes(text: str) -> int:
    size = float(text) * 2**20
    if not 1 <= size < 2**63:
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, got {text}")
    return int(size)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..generate_cli import add_model_arguments
    add_model_arguments(p)  # --model / --preset / --tokenizer
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default="autoglm-phone-9b")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (/health stays open)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="allow image_url parts naming local files (or file:// URLs) under DIR")
    p.add_argument("--max-concurrency", type=int, default=32, help="requests batched in one engine step")
    p.add_argument("--max-queued", type=int, default=256, help="requests in flight beyond which new ones get 429")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-body-mb", type=_mebibytes, default="64", dest="max_body_bytes", metavar="MB",
                   help="request bodies over MB MiB get 413, before any decoding (default: 64)")
    p.add_argument("--reasoning-format", choices=["separate", "inline"], default="separate",
                   help="reasoning as reasoning_content (separate) or kept as <think>...</think> in content")
    p.add_argument("--backend", choices=["fast", "reference"], help="default: fast where the kernels can run")
    p.add_argument("--device", help="default: cuda if available, else cpu")


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from ..engine import SchedulerConfig
    from ..generate_cli import load_engine
    from .app import create_app
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    log = logging.getLogger("autoglm_fast.server")
    sched = SchedulerConfig(max_num_seqs=args.max_concurrency, max_model_len=args.max_model_len,
                            max_num_batched_tokens=max(2048, args.max_concurrency))
    kw = dict(device=args.device, backend=args.backend, scheduler=sched)
    engine = load_engine(args, **kw)
    app = create_app(engine, args.served_model_name, args.api_key, args.allowed_local_media_path,
                     args.max_queued, args.max_images, args.reasoning_format,
                     max_body_bytes=args.max_body_bytes)
    log.info("Model loaded successfully (%s backend on %s)", engine.backend, engine.device)
    sys.stderr.flush()
    uvicorn.run(app, host=args.host, port=args.port)
