"""Timing, device ceilings and the roofline arithmetic shared by the benchmark runners."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch


@dataclass
class Ceilings:
    """What this device can do, measured at the start of a run (so % of roofline means the same anywhere)."""
    device: str
    bandwidth_gbs: float    # device-to-device copy, GB/s (read + write counted)
    matmul_tflops: float    # dense fp16 matmul


@dataclass
class Row:
    case: str
    shape: str
    ms: dict[str, float]                       # implementation -> median ms ("ours", "eager", "compile")
    quantiles: dict[str, tuple[float, float]] = field(default_factory=dict)  # 20 % / 80 %
    bytes: int = 0
    flops: int = 0

    def roofline_ms(self, c: Ceilings) -> float:
        """The larger of the memory and the compute lower bound."""
        return max(self.bytes / (c.bandwidth_gbs * 1e9), self.flops / (c.matmul_tflops * 1e12)) * 1e3

    def to_dict(self, c: Ceilings) -> dict:
        ours = self.ms["ours"]
        d = asdict(self)
        d.update(gbs=self.bytes / ours / 1e6, tflops=self.flops / ours / 1e9,
                 roofline_pct=100 * self.roofline_ms(c) / ours,
                 speedup={k: v / ours for k, v in self.ms.items() if k != "ours"})
        return d


def bench(fn: Callable[[], object], smoke: bool = False) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) ms. GPU: triton.testing.do_bench; smoke mode: one timed call on any device."""
    if smoke:
        fn()
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms, ms
    from triton.testing import do_bench
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def measure_ceilings(smoke: bool = False) -> Ceilings:
    if smoke or not torch.cuda.is_available():
        return Ceilings("cpu (smoke)", bandwidth_gbs=float("nan"), matmul_tflops=float("nan"))
    n = 1 << 28  # 512 MiB of fp16: far past any cache
    src = torch.empty(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))[0]
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    mm_ms = bench(lambda: a @ a)[0]
    return Ceilings(torch.cuda.get_device_name(), bandwidth_gbs=2 * n * 2 / copy_ms / 1e6,
                    matmul_tflops=2 * 8192 ** 3 / mm_ms / 1e9)


def compiled(fn: Callable, smoke: bool) -> Callable | None:
    """torch.compile baseline; skipped in smoke mode (compiling takes longer than the run)."""
    if smoke:
        return None
    return torch.compile(fn, mode="max-autotune-no-cudagraphs")


def format_rows(rows: list[Row], c: Ceilings) -> str:
    head = (f"{'case':<22} {'shape':<26} {'ours ms':>9} {'eager ms':>9} {'compile ms':>10} "
            f"{'GB/s':>8} {'TFLOP/s':>8} {'roofline':>8} {'vs eager':>8} {'vs compile':>10}")
    lines = [f"device: {c.device}; copy {c.bandwidth_gbs:.0f} GB/s, fp16 matmul {c.matmul_tflops:.0f} TFLOP/s",
             head]
    for r in rows:
        d = r.to_dict(c)
        eager, comp = r.ms.get("eager", float("nan")), r.ms.get("compile", float("nan"))
        lines.append(f"{r.case:<22} {r.shape:<26} {r.ms['ours']:>9.4f} {eager:>9.4f} {comp:>10.4f} "
                     f"{d['gbs']:>8.1f} {d['tflops']:>8.2f} {d['roofline_pct']:>7.1f}% "
                     f"{d['speedup'].get('eager', float('nan')):>7.2f}x {d['speedup'].get('compile', float('nan')):>9.2f}x")
    return "\n".join(lines)


def measure(case: str, shape: str, ours: Callable, eager: Callable, smoke: bool, bytes: int, flops: int) -> Row:
    """One row: ours, eager and torch.compile of eager (not in smoke mode), median and 20/80 % quantiles."""
    ms, q = {}, {}
    for impl, fn in {"ours": ours, "eager": eager, "compile": compiled(eager, smoke)}.items():
        if fn is not None:
            med, lo, hi = bench(fn, smoke)
            ms[impl], q[impl] = med, (lo, hi)
    return Row(case, shape, ms, q, bytes, flops)


def cli(doc: str, name: str, run: Callable[[bool], tuple[list[Row], Ceilings]], argv: list[str] | None) -> int:
    """The shared command line of the runners: --json OUT, --smoke."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows and ceilings here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one call each, any device")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(f"{name} measures on a CUDA GPU; none here (use --smoke to exercise the runner)")
        return 0
    rows, ceilings = run(args.smoke)
    print(format_rows(rows, ceilings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": asdict(ceilings), "rows": [r.to_dict(ceilings) for r in rows],
                       "torch": torch.__version__}, f, indent=2)
    return 0
