"""Timing, device ceilings and the roofline arithmetic shared by the benchmark suites."""
from __future__ import annotations

import gc
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

NAN = float("nan")
SMALL_L2 = 64 << 10  # the L2 size --shapes small assumes (see Options.l2)


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
    # how L2 was kept out of the time: "rotate N copies" (graph rows), "flush" (do_bench flushes it before
    # each call), "one copy" (call timer, no L2 to speak of); "" for engine rows, whose steps stream GBs
    l2: str = ""

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


def bench(fn: Callable[[], object], timer: str, copies: int = 1) -> tuple[float, float, float, str]:
    """(median, 20 %, 80 %) ms and the timer actually used.

    "stream": triton.testing.do_bench (L2 flushed between calls). "graph": the calls unrolled into one CUDA
    graph (_graph_ms), for launch-bound decode-size ops; `copies`: how many input copies `fn` rotates
    through (see rotating) - falls back to "stream" if `fn` cannot be captured. "call": one timed call after
    one warm-up, on any device (smoke runs; measures nothing real).
    """
    if timer == "call":
        ms = timed_ms(fn, 1)
        return ms, ms, ms, timer
    fn()  # warm-up: Triton autotuning and torch.compile happen here, outside any capture
    from triton.testing import do_bench
    if timer == "graph":
        try:
            med, lo, hi = _graph_ms(fn, copies)
            return med, lo, hi, "graph"
        except Exception:  # noqa: BLE001 - host syncs or allocator use during capture: time it on the stream
            torch.cuda.synchronize()
    med, lo, hi = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi, "stream"


def _graph_ms(fn: Callable[[], object], copies: int, rep_ms: float = 20.0, replays: int = 10):
    """triton's do_bench_cudagraph, but the unrolled call count is a multiple of `copies` (at least one
    round): the graph reads every copy equally often, each replay picks up where the last one ended, and a
    rotation longer than the ~20 ms of calls still cycles through all of its copies (else the graph would
    replay a subset that may fit L2)."""
    torch.cuda.synchronize()  # the inputs were made on the default stream
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = start.elapsed_time(end) / 5
        calls = max(copies, int(rep_ms / estimate) if estimate > 0 else 1000)
        calls = -(-calls // copies) * copies
        graph = torch.cuda.CUDAGraph()
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collected Triton kernel unloads its module: illegal while capturing
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
    med, lo, hi = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return med, lo, hi


def l2_cache_bytes(device) -> int:
    """The device's L2 size (0 without CUDA: the CPU smoke runs time one call and model no cache)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


def copies_needed(bytes_per_call: int, l2_bytes: int) -> int:
    """Copies whose rotation reads more than twice the L2 before a copy comes round again: a call then
    finds none of its inputs still cached, as a layer finds none of its weights or KV (the other layers'
    went through L2 since)."""
    if l2_bytes <= 0 or bytes_per_call <= 0:
        return 1
    return -(-2 * l2_bytes // bytes_per_call) + 1


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.nbytes
    if isinstance(obj, torch.nn.Module):
        return sum(t.nbytes for t in itertools.chain(obj.parameters(), obj.buffers()))
    return 0


@dataclass
class Rotation:
    """Independent copies of one row's inputs, used in turn (as a model's layers each read their own)."""
    copies: list[Sequence]
    l2: str  # what it does about L2, for the row: "rotate N copies", "flush" (no room for copies), "one copy"

    def cycle(self, fn: Callable[..., object]) -> Callable[[], object]:
        """A no-argument callable whose i-th call is fn(*copies[i mod n]); each cycle() counts from 0."""
        inputs = itertools.cycle(self.copies)
        return lambda: fn(*next(inputs))


def rotating(make_inputs: Callable[[], Sequence], bytes_per_call: int, l2_bytes: int,
             free_bytes: int | None = None) -> Rotation:
    """n = copies_needed(bytes_per_call, l2_bytes) fresh results of make_inputs() (tensors or modules).

    If n - 1 more copies would take over half the free memory (default: the CUDA device's, none on a
    CPU), there is one copy and l2 = "flush": the caller times on the stream, with L2 flushed per call.
    """
    first = tuple(make_inputs())
    n = copies_needed(bytes_per_call, l2_bytes)
    if n == 1:
        return Rotation([first], "one copy")
    if free_bytes is None:
        devices = {t.device for t in first if torch.is_tensor(t) and t.device.type == "cuda"}
        free_bytes = torch.cuda.mem_get_info(devices.pop())[0] if devices else None
    if free_bytes is not None and (n - 1) * sum(map(_nbytes, first)) > free_bytes // 2:
        return Rotation([first], "flush")
    return Rotation([first] + [tuple(make_inputs()) for _ in range(n - 1)], f"rotate {n} copies")


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
    part: str = "all"                  # "headline": only the headline rows; "rest": all others; "all"
    l2_bytes: int | None = None        # L2 size the rotations assume; None: see `l2`
    quantization: tuple[str, ...] = ("int8", "int4")  # the weight-only methods the quant rows measure
    tensor_parallel: tuple[int, ...] = ()  # rank counts the tp rows measure (none: no tp rows)

    @property
    def small(self) -> bool:
        return self.shapes == "small"

    @property
    def timer(self) -> str:
        return "stream" if torch.device(self.device).type == "cuda" else "call"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def l2(self) -> int:
        """The device's L2 - but a nominal SMALL_L2 with small shapes: their tiny rows then rotate a few
        dozen copies (the plumbing of real runs, on any device) instead of tens of thousands."""
        if self.l2_bytes is not None:
            return self.l2_bytes
        return SMALL_L2 if self.small else l2_cache_bytes(self.device)


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

    def selected(self, case: str, shape: str, headline: bool = False) -> bool:
        """-k matches "case shape"; --part headline keeps only the headline rows, --part rest the others."""
        part = self.opts.part
        if (part == "headline" and not headline) or (part == "rest" and headline):
            return False
        return self.matches(case, shape)

    def matches(self, case: str, shape: str) -> bool:
        """-k alone (case-insensitive substring of "case shape")."""
        return not self.opts.filter or self.opts.filter.lower() in f"{case} {shape}".lower()

    def add(self, case: str, shape: str, impls: dict[str, Callable | None], *,
            inputs: Callable[[], Sequence] | None = None, bytes: int = 0, flops: int = 0, graph: bool = False,
            check: bool = True, headline: bool = False) -> Row | None:
        """Time every implementation (plus torch.compile of "eager" when the options ask for it).

        inputs: makes one copy of the row's inputs; the implementations then take them as arguments.
        Graph-timed rows rotate through enough copies that L2 holds none of a call's inputs (rotating);
        stream-timed rows use one copy (do_bench flushes L2 before each call).
        graph=True: a decode-size op whose launch overhead would dominate - timed as CUDA-graph replay;
        it needs `inputs` (replaying one set of inputs would time L2, not HBM).
        check=True: ours and eager compute the same thing from the same inputs; their outputs are compared.
        headline: one of the rows `--part headline` runs (a time-boxed GPU check measures those first).
        An implementation that raises is recorded as an error on the row; the run goes on.
        """
        if graph and inputs is None:
            raise TypeError(f"{case} {shape}: a graph-timed row needs inputs= (copies to rotate past L2)")
        if not self.selected(case, shape, headline):
            return None
        impls = {k: v for k, v in impls.items() if v is not None}
        if self.opts.compile_mode and "eager" in impls:
            impls["compile"] = None  # compiled below, afresh for this case
        row = Row(self.suite, case, shape, self.opts.dtype_name, {}, bytes=bytes, flops=flops)
        timer = "graph" if graph and self.opts.timer == "stream" else self.opts.timer
        rotation = None
        if inputs is not None:
            try:
                rotation = (rotating(inputs, bytes, self.opts.l2) if graph and timer != "stream" else
                            Rotation([tuple(inputs())], "flush" if timer == "stream" else "one copy"))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the row says so, the run goes on
                row.errors = {impl: _why(e) for impl in impls}
                return self.record(row)
            timer = "stream" if rotation.l2 == "flush" else timer  # no room for copies: flush L2 instead
        args = rotation.copies[0] if rotation else ()
        ready, used = {}, set()  # impl -> (its function of the inputs, the timed no-argument call)
        for impl, fn in impls.items():
            try:
                fn = compiled(impls["eager"], self.opts.compile_mode) if impl == "compile" else fn
                call = rotation.cycle(fn) if rotation else fn
                med, lo, hi, how = bench(call, timer, len(rotation.copies) if rotation else 1)
                row.ms[impl], row.quantiles[impl], ready[impl] = med, (lo, hi), (fn, call)
                used.add(how)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                row.errors[impl] = _why(e)
        if len(used) > 1:  # one could not be captured: time them all on the stream, so the row compares alike
            for impl, (_, call) in ready.items():
                med, lo, hi, _ = bench(call, "stream")
                row.ms[impl], row.quantiles[impl] = med, (lo, hi)
            used = {"stream"}
        row.timer = used.pop() if used else timer
        row.l2 = "flush" if row.timer == "stream" else rotation.l2 if rotation else "one copy"
        if check and "ours" in ready and "eager" in ready:  # a fast wrong kernel must not post a number
            err = max_error(ready["ours"][0](*args), ready["eager"][0](*args))
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
