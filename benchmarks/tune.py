"""`autoglm-fast bench --tune`: re-tune the prefill attention's config table on this GPU.

For each q bucket (1, 2, 4, ..., 4096) it times every prefill config offered on this GPU's target
(`PREFILL_TARGETS`) with `triton.testing.do_bench` at GLM-4-9B's shapes — 28 query / 2 KV heads of 128,
pages of 32 handed out in shuffled order, one causal prefill of q_len = bucket on an empty cache — picks
the fastest, prints the timings, and rewrites this target's entry of kernels/tuned/paged_prefill.json (the
table the launcher reads; other targets' entries are kept).
"""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import torch
import triton

from autoglm_fast.kernels.paged_attention import (MAX_Q_BUCKET, PREFILL_BY_NAME, PREFILL_TARGETS, SPEC_BLOCK_SIZE,
                                                  SPEC_HEAD_DIM, SPEC_HEADS, SPEC_KV_HEADS, paged_prefill_attention,
                                                  paged_prefill_kernel)
from autoglm_fast.kernels.utils import TUNED_DIR, device_target, forced_config, interpreting, tuned_table

TABLE = TUNED_DIR / "paged_prefill.json"
BUCKETS = [2 ** i for i in range(int(math.log2(MAX_Q_BUCKET)) + 1)]


def prefill_case(q_len: int, dtype: torch.dtype, device="cuda"):
    """The arguments of one GLM-4-9B prefill of q_len tokens on an empty cache."""
    pages = triton.cdiv(q_len, SPEC_BLOCK_SIZE)
    k_pool, v_pool = torch.randn(2, pages, SPEC_BLOCK_SIZE, SPEC_KV_HEADS, SPEC_HEAD_DIM, device=device).to(dtype)
    i32 = dict(dtype=torch.int32, device=device)
    q = torch.randn(q_len, SPEC_HEADS, SPEC_HEAD_DIM, device=device).to(dtype)
    tables = torch.randperm(pages, device=device).to(torch.int32)[None]  # pages in a cache's shuffled order
    return (q, k_pool, v_pool, tables, torch.tensor([q_len], **i32), torch.tensor([0, q_len], **i32), q_len)


def time_config(name: str, args) -> float:
    """Median ms of one prefill launch at `name`."""
    out = torch.empty_like(args[0])
    with forced_config(paged_prefill_kernel, PREFILL_BY_NAME[name]):
        run = lambda: paged_prefill_attention(*args, out=out, max_seq_len=args[-1])  # noqa: E731
        run()  # compile outside the timing
        return triton.testing.do_bench(run, return_mode="median")


def causal_tflops(q_len: int, ms: float) -> float:
    pairs = q_len * (q_len + 1) // 2  # (query, key) pairs under the causal mask on an empty cache
    return 4 * pairs * SPEC_HEAD_DIM * SPEC_HEADS / (ms * 1e9)


def write_table(path: Path, target: str, picks: dict[int, str], source: str) -> None:
    """Set `target`'s head_dim-SPEC_HEAD_DIM entry of the table at `path` to `picks` (bucket -> config name)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table[target] = {"source": source, str(SPEC_HEAD_DIM): {str(b): picks[b] for b in sorted(picks)}}
    path.write_text(json.dumps(table, indent=1) + "\n")
    tuned_table.cache_clear()


def run(args) -> int:
    if not torch.cuda.is_available():
        raise ValueError("--tune needs a CUDA GPU: it times the prefill attention's configs on the GPU whose "
                         "table it rewrites, and torch sees no CUDA device here")
    if interpreting():
        raise ValueError("--tune times compiled kernels: unset TRITON_INTERPRET")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype or "float16"]
    target = device_target(torch.cuda.current_device())
    names = [n for n, targets in PREFILL_TARGETS.items() if target in targets]
    gpu = torch.cuda.get_device_name()
    print(f"tuning paged prefill attention on {gpu} ({target}), {dtype}, GLM-4-9B shapes; median ms per config:")
    print(f"{'q bucket':>8} " + " ".join(f"{n:>14}" for n in names) + f"  {'best':<14} TFLOP/s")
    picks = {}
    for bucket in BUCKETS:
        case = prefill_case(bucket, dtype)
        ms = {n: time_config(n, case) for n in names}
        picks[bucket] = best = min(ms, key=ms.get)
        print(f"{bucket:>8} " + " ".join(f"{ms[n]:>14.4f}" for n in names)
              + f"  {best:<14} {causal_tflops(bucket, ms[best]):7.1f}")
    source = (f"measured: {gpu}, {dtype}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{datetime.date.today().isoformat()}")
    write_table(TABLE, target, picks, source)
    print(f"wrote {target}'s entry of {TABLE}")
    return 0
