"""`autoglm-fast bench` (also `python -m benchmarks`): the benchmark suites, their report, the comparison.

    autoglm-fast bench [--suite kernels|e2e|all ...] [--part all|headline|rest] [--shapes small|real]
                       [--out DIR] [--json OUT] [--markdown OUT] [--plot DIR] [--compare BASE.json]
                       [-k FILTER] [--load RUN.json ...] [--require-graphs] [-q int8 int4] [-tp N ...]

Each run first measures the device's copy bandwidth and dense matmul rate, then times every case:
ours vs eager PyTorch vs torch.compile (and SDPA for attention), reported as ms, GB/s or TFLOP/s and %
of the roofline. On a machine without CUDA it runs the small shapes in Triton's interpreter, one call
each: that checks the runner and the report, it measures nothing worth reading.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import report
from .common import Options, Recorder, measure_ceilings

SUITES = ("kernels", "e2e")
PARTS = ("all", "headline", "rest")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from autoglm_fast.generate_cli import positive_int
    cuda = torch.cuda.is_available()
    p.add_argument("--suite", choices=SUITES + ("all",), nargs="+", default=["all"],
                   help="suites to run, in this order (default: all = %s)" % " ".join(SUITES))
    p.add_argument("--part", choices=PARTS, default="all",
                   help="headline: only the rows a time-boxed GPU check needs first (e2e decode b1 at every "
                        "context, and int8 / int4; decode attention at 4k and 32k; prefill attention at 4k); "
                        "rest: all the others; all (default)")
    p.add_argument("--shapes", choices=("small", "real"), default="real" if cuda else "small",
                   help="real: AutoGLM-Phone-9B's shapes (needs a CUDA GPU); small: tiny shapes on any device "
                        "(default: %(default)s here)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--quantization", "-q", choices=("int8", "int4"), nargs="+", default=["int8", "int4"],
                   help="the weight-only methods the quantized rows measure (kernels and e2e decode vs the "
                        "unquantized engine; default: both)")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, nargs="+", default=[], metavar="N",
                   help="also time the engine on N ranks (tp decode / throughput rows vs one device; N GPUs, or N "
                        "CPU processes); default: no tp rows")
    p.add_argument("-k", "--filter", metavar="TEXT",
                   help="only kernel cases whose 'case shape' contains TEXT (e2e: only backends matching it)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs" if cuda else "none",
                   help="torch.compile mode of the compile baselines, or 'none' (default: %(default)s)")
    p.add_argument("--compile-reference", action="store_true",
                   help="e2e: also time torch.compile of the reference backend (compiles the 9B decoder: slow)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.md and plots/ here (default for a "
                   "measuring run given none of --json/--markdown/--plot: bench-results/<time>-<device>)")
    p.add_argument("--json", metavar="OUT", help="write the run here (rewritten after every row)")
    p.add_argument("--markdown", metavar="OUT", help="write the Markdown table here")
    p.add_argument("--plot", metavar="DIR", help="write speedup.png and roofline.png here (needs matplotlib)")
    p.add_argument("--compare", metavar="BASE.json", help="per-row speedup vs a saved run; flags regressions")
    p.add_argument("--threshold", type=float, default=5.0, help="regression threshold in %% (default 5)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when --compare flags a regression")
    p.add_argument("--require-graphs", action="store_true",
                   help="exit 1 when an implementation that asked for CUDA graphs fell back to eager decoding "
                        "(a CPU run, where graphs are off, passes)")
    p.add_argument("--load", metavar="RUN.json", nargs="+",
                   help="measure nothing: render saved run(s) from one device, merged (with --json: saved merged)")
    p.add_argument("--tune", action="store_true",
                   help="only re-tune the prefill attention's config table for this GPU (needs CUDA): time every "
                        "config per q bucket (--dtype), write the fastest to kernels/tuned/paged_prefill.json")


def _git_commit() -> str:
    if os.environ.get("AUTOGLM_FAST_COMMIT"):
        return os.environ["AUTOGLM_FAST_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    import triton
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform(), "interpreter": device == "cpu"}
    if device == "cuda":
        env.update(device=torch.cuda.get_device_name(), capability="sm_%d%d" % torch.cuda.get_device_capability())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, interpreter)"
    return env


def _options(args) -> Options:
    cuda = torch.cuda.is_available()
    if args.shapes == "real" and not cuda:
        raise ValueError("--shapes real needs a CUDA GPU (none here); --shapes small runs anywhere")
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    mode = None if args.compile_mode in ("none", "") else args.compile_mode
    return Options(args.shapes, device, dtype, mode, args.filter, args.compile_reference, args.part,
                   quantization=tuple(args.quantization), tensor_parallel=tuple(args.tensor_parallel_size))


def measure(args, opts: Options) -> dict:
    """Run the chosen suites; with --json the file is rewritten after every row (a killed run keeps its rows)."""
    if opts.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first imported, just below
    from . import adapter, backbone, e2e, e2e_glm4v, e2e_serving, parallel, quant

    print(f"measuring the ceilings of {opts.device} ...", flush=True)
    ceilings = measure_ceilings(opts.device, quick=opts.small)
    suites = SUITES if "all" in args.suite else tuple(dict.fromkeys(args.suite))
    run = {"schema": report.SCHEMA, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": _git_commit(), "environment": environment(opts.device),
           "options": {"suites": list(suites), "shapes": opts.shapes, "dtype": opts.dtype_name,
                       "compile_mode": opts.compile_mode, "filter": opts.filter,
                       "compile_reference": opts.compile_reference, "part": opts.part},
           "ceilings": asdict(ceilings), "rows": [], "complete": False}
    for line in report.header(run):
        print(line.replace("**", "").replace("`", ""))

    landed_rows: list = []  # the Row objects behind run["rows"]: a row reported again replaces its entry
    started = time.perf_counter()  # progress lines say when each row landed: what a time box must allow

    def landed(row):
        d = row.to_dict(ceilings)
        at = next((i for i, r in enumerate(landed_rows) if r is row), None)
        if at is None:
            landed_rows.append(row)
            run["rows"].append(d)
        else:
            run["rows"][at] = d
        base = "  ".join(f"{k} {v:.4g}" for k, v in row.ms.items() if k != "ours")
        errors = f"  ERRORS {row.errors}" if row.errors else ""
        graphs = f"  graphs {row.graphs}" if row.graphs else ""
        l2 = f"  L2: {row.l2}" if row.l2 else ""
        ours = row.ms.get("ours", float("nan"))
        print(f"[{row.suite} +{time.perf_counter() - started:.0f} s] {row.case} | {row.shape} | ours {ours:.4g} ms  "
              f"{base}  | {d['roofline_pct']:.1f} % roofline{l2}{graphs}{errors}", flush=True)
        if args.json:
            report.write_json(run, args.json)

    for suite in suites:
        rec = Recorder(suite, opts, landed)
        # backbone first: its decode and prefill rows carry the headline targets if a time box cuts the run;
        # the quantized rows next (their decode b1 is a headline row too)
        {"kernels": lambda: (backbone.run(rec), quant.run_kernels(rec), adapter.run(rec)),
         "e2e": lambda: (e2e.run(rec), quant.run_e2e(rec), parallel.run(rec), e2e_glm4v.run(rec),
                         e2e_serving.run(rec))}[suite]()
    run["complete"] = True
    return run


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _outputs(args) -> None:
    """Fill --json/--markdown/--plot from --out (or the default folder); explicit paths win."""
    out = args.out
    if out is None and not args.load and not (args.json or args.markdown or args.plot):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = f"bench-results/{stamp}-{device}"
    if out is None:
        return
    args.json = args.json or str(Path(out) / "results.json")
    args.markdown = args.markdown or str(Path(out) / "results.md")
    if args.plot is None and _have_matplotlib():  # plots are an optional extra unless asked for by name
        args.plot = str(Path(out) / "plots")
    elif args.plot is None:
        print("no matplotlib: no plots (pip install 'autoglm-fast[bench]')", file=sys.stderr)


def run_cli(args) -> int:
    if args.tune:
        from .tune import run as tune
        return tune(args)
    if not 0 <= args.threshold < 1000:
        raise ValueError(f"--threshold must be a percentage in [0, 1000), got {args.threshold}")
    if args.plot and not _have_matplotlib():  # fail before measuring, not after
        raise ValueError("--plot needs matplotlib: pip install 'autoglm-fast[bench]'")
    _outputs(args)
    base = report.load(args.compare) if args.compare else None
    run = report.merge([report.load(p) for p in args.load]) if args.load else measure(args, _options(args))
    if args.json:
        report.write_json(run, args.json)
    text = report.markdown(run)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    if args.plot:
        for path in report.plot(run, args.plot):
            print(f"wrote {path}")
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    status = 0
    if any("ours" in r.get("errors", {}) for r in run["rows"]):
        print("some of our implementations failed (see the errors above)", file=sys.stderr)
        status = 1
    fallbacks = report.graph_fallbacks(run)
    if fallbacks:  # said every time; an exit status only when asked for
        print("CUDA GRAPHS FELL BACK to eager decoding (these are not graphed times): " + "; ".join(fallbacks),
              file=sys.stderr)
        status = 1 if args.require_graphs else status
    if base is not None:
        text, regressions = report.compare(run, base, args.threshold / 100)
        print("\n" + text)
        if regressions and args.fail_on_regression:
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="autoglm-fast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_cli(args)
    except ValueError as e:
        print(f"autoglm-fast bench: error: {e}", file=sys.stderr)
        return 2
