"""Timing, device ceilings and the roofline arithmetic shared by the benchmark suites."""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

NAN = float("nan")


@dataclass
class Ceilings:
    """What this device can do, measured at the start of a run (so % of roofline means the same anywhere)."""
    device: str
    bandwidth_gbs: float                  # device-to-device copy, GB/s (read + write counted)
    matmul_tflops: dict[str, float]       # dtype name ("float16", ...) -> dense matmul TFLOP/s

    def peak_tflops(self, dtype: str) -> float:
        return self.matmul_tflops.get(dtype, NAN)


@dataclass
class Row:
    """One case: median ms per implementation ("ours" is always the one the row is about)."""
    suite: str
    case: str
    shape: str
    dtype: str
    ms: dict[str, float]
    quantiles: dict[str, tuple[float, float]] = field(default_factory=dict)  # 20 % / 80 %
    bytes: int = 0                 # the least HBM traffic the op needs
    flops: int = 0
    timer: str = "stream"          # "stream" (do_bench), "graph" (CUDA-graph replay), "call", "engine"
    metrics: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # implementation -> why it has no time
    # implementation -> the CUDA-graph state its engine reported after it ran ("captured", "fallback",
    # "pending", "off" without CUDA); only implementations that asked for graphs are listed
    graphs: dict[str, str] = field(default_factory=dict)

    def _bounds_ms(self, c: Ceilings) -> tuple[float, float]:
        """(memory, compute) lower bounds in ms; a bound that is not known counts as 0."""
        memory = self.bytes / (c.bandwidth_gbs * 1e6) if self.bytes else 0.0
        compute = self.flops / (c.peak_tflops(self.dtype) * 1e9) if self.flops else 0.0
        return memory, compute

    def roofline_ms(self, c: Ceilings) -> float:
        """The larger of the memory and the compute lower bound."""
        bound = max(self._bounds_ms(c))
        return bound if bound > 0 else NAN  # NaN ceilings give NaN through the max as well

    def bound(self, c: Ceilings) -> str:
        memory, compute = self._bounds_ms(c)
        return "memory" if memory >= compute else "compute"

    def to_dict(self, c: Ceilings) -> dict:
        """The row plus what follows from it: GB/s, TFLOP/s, % of roofline, speedup of ours over the others."""
        ours, roofline = self.ms.get("ours", NAN), self.roofline_ms(c)
        d = asdict(self)
        d.update(gbs=self.bytes / ours / 1e6 if self.bytes else NAN,
                 tflops=self.flops / ours / 1e9 if self.flops else NAN,
                 roofline_ms=roofline, bound=self.bound(c), roofline_pct=100 * roofline / ours,
                 roofline_pct_by_impl={k: 100 * roofline / v if v else NAN for k, v in self.ms.items()},
                 speedup={k: v / ours for k, v in self.ms.items() if k != "ours"})
        return d


def bench(fn: Callable[[], object], timer: str) -> tuple[float, float, float, str]:
    """(median, 20 %, 80 %) ms and the timer actually used.

    "stream": triton.testing.do_bench (L2 flushed between calls). "graph": the calls unrolled into one CUDA
    graph (do_bench_cudagraph), for launch-bound decode-size ops - falls back to "stream" if `fn` cannot be
    captured. "call": one timed call after one warm-up, on any device (smoke runs; measures nothing real).
    """
    if timer == "call":
        ms = timed_ms(fn, 1)
        return ms, ms, ms, timer
    fn()  # warm-up: Triton autotuning and torch.compile happen here, outside any capture
    from triton.testing import do_bench, do_bench_cudagraph
    if timer == "graph":
        try:
            med, lo, hi = do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
            return med, lo, hi, "graph"
        except Exception:  # noqa: BLE001 - host syncs or allocator use during capture: time it on the stream
            torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi, "stream"


def free_cuda_memory() -> None:
    """After a model is dropped: collect it and hand its blocks back, so the next row starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_engine(row: "Row", impl: str, build: Callable[[], object], measure: Callable[[object], None]) -> None:
    """Build an engine and measure with it; a failure (out of memory, a missing extra) becomes
    row.errors[impl], and the engine's memory is handed back either way."""
    engine = None
    try:
        engine = build()
        measure(engine)
    except Exception as e:  # noqa: BLE001 - record it, go on
        row.errors.setdefault(impl, _why(e))
    finally:
        del engine
        free_cuda_memory()


def sync() -> None:
    """Wait for the GPU (if any), so wall-clock times cover the work and not just its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], reps: int) -> float:
    """Wall-clock ms per call over `reps` calls, after one warm-up call."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) * 1e3 / reps


def measure_ceilings(device: str, quick: bool = False) -> Ceilings:
    """Copy bandwidth and dense matmul rate of `device`, measured now.

    CUDA: a 512 MiB copy (far past any cache) and 8192^3 matmuls in fp16 and bf16, timed with do_bench.
    CPU (smoke runs): a 64 MiB copy and an fp32 matmul with a wall clock - enough to make the arithmetic
    of a smoke run concrete, not a statement about the CPU.
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench
        n = 1 << 28
        src = torch.empty(n, dtype=torch.float16, device=device)
        dst = torch.empty_like(src)
        copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
        del src, dst
        peaks = {}
        for dtype in (torch.float16, torch.bfloat16):
            a = torch.randn(8192, 8192, dtype=dtype, device=device)
            b = torch.randn(8192, 8192, dtype=dtype, device=device)
            peaks[str(dtype).removeprefix("torch.")] = 2 * 8192 ** 3 / do_bench(lambda: a @ b, return_mode="median") / 1e9
        return Ceilings(torch.cuda.get_device_name(device), 2 * n * 2 / copy_ms / 1e6, peaks)
    n, m = (1 << 24) if not quick else (1 << 20), 512 if quick else 1024
    src, dst = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    copy_ms = timed_ms(lambda: dst.copy_(src), 5)
    a = torch.randn(m, m)
    mm_ms = timed_ms(lambda: a @ a, 5)
    return Ceilings("cpu", 2 * n * 4 / copy_ms / 1e6, {"float32": 2 * m ** 3 / mm_ms / 1e9})


@dataclass
class Options:
    shapes: str = "small"              # "small": tiny shapes (any device); "real": AutoGLM-Phone-9B's
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    compile_mode: str | None = None    # torch.compile mode for the "compile" baselines; None: no such column
    filter: str | None = None          # only cases whose "case shape" contains this (case-insensitive)
    compile_reference: bool = False    # e2e: also time torch.compile of the reference backend

    @property
    def small(self) -> bool:
        return self.shapes == "small"

    @property
    def timer(self) -> str:
        return "stream" if torch.device(self.device).type == "cuda" else "call"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def compiled(fn: Callable, mode: str) -> Callable:
    """torch.compile of an eager baseline, compiled afresh for this case.

    Resetting dynamo first matters: every case's lambda shares one code object, so without it the 9th
    shape would hit the recompile limit and silently run eager - and dynamic shapes would creep in.
    """
    torch._dynamo.reset()
    return torch.compile(fn, mode=mode, dynamic=False)


# |ours - eager| / (1 + |eager|) allowed per dtype: reduction order differs, fp16 keeps ~3 digits.
TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-3}


def max_error(ours, eager) -> float:
    """Largest |ours - eager| / (1 + |eager|) over the output tensor(s); inf when shapes differ."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    if len(ours) != len(eager):
        return float("inf")
    worst = 0.0
    for a, b in zip(ours, eager):
        if a.shape != b.shape:
            return float("inf")
        if a.numel():
            b = b.float()
            err = float(((a.float() - b).abs() / (1 + b.abs())).max())
            worst = max(worst, err if err == err else float("inf"))  # NaN counts as the worst
    return worst


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


class Recorder:
    """Collects a suite's rows; `on_row` sees each one as it lands (progress lines, incremental JSON)."""

    def __init__(self, suite: str, opts: Options, on_row: Callable[[Row], None] | None = None):
        self.suite, self.opts, self.on_row, self.rows = suite, opts, on_row, []

    def selected(self, case: str, shape: str) -> bool:
        return not self.opts.filter or self.opts.filter.lower() in f"{case} {shape}".lower()

    def add(self, case: str, shape: str, impls: dict[str, Callable | None], *, bytes: int = 0, flops: int = 0,
            graph: bool = False, check: bool = True) -> Row | None:
        """Time every implementation (plus torch.compile of "eager" when the options ask for it).

        graph=True: a decode-size op whose launch overhead would dominate - timed as CUDA-graph replay.
        check=True: ours and eager compute the same thing from the same inputs; their outputs are compared.
        An implementation that raises is recorded as an error on the row; the run goes on.
        """
        if not self.selected(case, shape):
            return None
        impls = dict(impls)
        if self.opts.compile_mode and impls.get("eager") is not None:
            impls["compile"] = lambda: compiled(impls["eager"], self.opts.compile_mode)
        row = Row(self.suite, case, shape, self.opts.dtype_name, {}, bytes=bytes, flops=flops)
        timer = "graph" if graph and self.opts.timer == "stream" else self.opts.timer
        ready, used = {}, set()
        for impl, fn in impls.items():
            if fn is None:
                continue
            try:
                fn = fn() if impl == "compile" else fn
                med, lo, hi, how = bench(fn, timer)
                row.ms[impl], row.quantiles[impl], ready[impl] = med, (lo, hi), fn
                used.add(how)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                row.errors[impl] = _why(e)
        if len(used) > 1:  # one could not be captured: time them all on the stream, so the row compares alike
            for impl, fn in ready.items():
                med, lo, hi, _ = bench(fn, "stream")
                row.ms[impl], row.quantiles[impl] = med, (lo, hi)
            used = {"stream"}
        row.timer = used.pop() if used else timer
        if check and "ours" in ready and "eager" in ready:  # a fast wrong kernel must not post a number
            err = max_error(ready["ours"](), ready["eager"]())
            row.metrics["max error vs eager"] = err
            if not err <= TOLERANCE.get(row.dtype, 2e-2):
                row.errors["ours"] = f"differs from eager: max |ours - eager| / (1 + |eager|) = {err:.3g}"
        return self.record(row)

    def record(self, row: Row) -> Row:
        """Add `row`, or report it again after it gained implementations (the e2e suite fills rows in turn)."""
        if not any(r is row for r in self.rows):
            self.rows.append(row)
        if self.on_row:
            self.on_row(row)
        return row
