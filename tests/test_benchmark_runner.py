"""The benchmark suite: roofline arithmetic with known numbers, the CPU smoke run of `autoglm-fast bench`
(JSON, Markdown, plots well formed), compare mode, and clear errors. It asserts no speed."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoglm_fast.benchmarks import report
from autoglm_fast.benchmarks.common import (TOLERANCE, Ceilings, Options, Recorder, Row, copies_needed, max_error,
                                            measure_ceilings, rotating)
from autoglm_fast.benchmarks.suite import main as bench_main
from kernel_harness import requires_kernels

CLI = str(Path(sys.executable).parent / "autoglm-fast")
CEIL = Ceilings("test", bandwidth_gbs=1000.0, matmul_tflops={"float16": 100.0, "bfloat16": 50.0})
# What `autoglm-fast bench` picks on this machine: these tests also run on CUDA machines.
ON_GPU = torch.cuda.is_available()
DEVICE, DTYPE, GRAPHS = ("cuda", "float16", "captured") if ON_GPU else ("cpu", "float32", "off")


def test_roofline_is_the_larger_bound_with_the_rows_dtype_peak():
    mem = Row("k", "copy-like", "-", "float16", {"ours": 2.0, "eager": 4.0, "compile": 3.0}, bytes=10**9, flops=10**9)
    d = mem.to_dict(CEIL)
    assert mem.roofline_ms(CEIL) == pytest.approx(1.0)      # 1 GB at 1000 GB/s = 1 ms > 1 GFLOP at 100 TFLOP/s
    assert d["bound"] == "memory" and d["roofline_pct"] == pytest.approx(50.0) and d["gbs"] == pytest.approx(500.0)
    assert d["speedup"] == {"eager": pytest.approx(2.0), "compile": pytest.approx(1.5)}
    gemm = Row("k", "gemm", "-", "float16", {"ours": 0.5}, bytes=10**6, flops=4 * 10**10)
    assert gemm.roofline_ms(CEIL) == pytest.approx(0.4)     # compute bound: 40 GFLOP at 100 TFLOP/s
    assert gemm.to_dict(CEIL)["tflops"] == pytest.approx(80.0) and gemm.bound(CEIL) == "compute"
    assert gemm.to_dict(CEIL)["roofline_pct"] == pytest.approx(80.0)
    gemm.dtype = "bfloat16"                                  # half the peak: twice the bound
    assert gemm.roofline_ms(CEIL) == pytest.approx(0.8)
    bytes_only = Row("k", "norm", "-", "float16", {"ours": 0.004}, bytes=2 * 10**6)
    assert bytes_only.roofline_ms(CEIL) == pytest.approx(0.002) and math.isnan(bytes_only.to_dict(CEIL)["tflops"])


def test_unknown_bounds_give_nan_not_a_number_that_looks_real():
    assert math.isnan(Row("e2e", "ttft", "-", "float16", {"ours": 1.0}).roofline_ms(CEIL))
    fp8 = Row("k", "gemm", "-", "float8", {"ours": 1.0}, flops=10**9)  # no measured peak for this dtype
    assert math.isnan(fp8.roofline_ms(CEIL))
    no_ceilings = Ceilings("cpu", float("nan"), {})
    assert math.isnan(Row("k", "x", "-", "float32", {"ours": 1.0}, bytes=10).to_dict(no_ceilings)["roofline_pct"])


def test_cpu_ceilings_are_measured():
    c = measure_ceilings("cpu", quick=True)
    assert c.bandwidth_gbs > 0 and c.peak_tflops("float32") > 0


def test_recorder_keeps_going_past_a_failing_implementation_and_filters():
    rows = []
    rec = Recorder("kernels", Options(filter="keep"), rows.append)

    def broken():
        raise RuntimeError("boom\nsecond line")

    row = rec.add("keep me", "1x1", {"ours": lambda: None, "eager": broken}, bytes=8)
    assert row.ms["ours"] > 0 and "eager" not in row.ms and row.errors == {"eager": "RuntimeError: boom"}
    assert rec.add("skipped", "1x1", {"ours": lambda: None}) is None
    assert rows == [row] and row.timer == "call"


def test_recorder_flags_ours_when_it_disagrees_with_eager():
    rec, x = Recorder("kernels", Options()), torch.ones(4)
    wrong = rec.add("wrong", "4", {"ours": lambda: x * 1.1, "eager": lambda: x})
    assert "differs from eager" in wrong.errors["ours"]
    assert wrong.metrics["max error vs eager"] == pytest.approx(0.05)  # |1.1 - 1| / (1 + 1)
    right = rec.add("right", "4", {"ours": lambda: (x, x), "eager": lambda: (x, x + 1e-5)})
    assert not right.errors and right.metrics["max error vs eager"] < 1e-5
    assert max_error(x, x[:2]) == math.inf and max_error(torch.tensor([math.nan]), torch.zeros(1)) == math.inf
    assert max_error((x,), (x, x)) == math.inf


def test_rotation_copies_are_distinct_and_used_in_turn():
    made = []

    def inputs():
        made.append((torch.zeros(256), torch.ones(1)))  # 1 KiB + 4 bytes
        return made[-1]

    l2 = 10_000  # a fake L2: n = ceil(2 * 10000 / 1024) + 1 = 21
    assert copies_needed(1024, l2) == 21 and copies_needed(20_000, l2) == 2 and copies_needed(20_001, l2) == 2
    assert copies_needed(19_999, l2) == 3 and copies_needed(1024, 0) == 1  # no L2 (a CPU): one copy
    rot = rotating(inputs, 1024, l2)
    assert len(rot.copies) == len(made) == 21 and rot.l2 == "rotate 21 copies"
    assert len({t.data_ptr() for copy in rot.copies for t in copy}) == 2 * 21  # no two copies share memory
    seen = []
    call = rot.cycle(lambda x, one: seen.append(x.data_ptr()))
    for _ in range(50):
        call()
    assert seen == [rot.copies[i % 21][0].data_ptr() for i in range(50)]
    again = []  # every cycle() counts from copy 0
    rot.cycle(lambda x, one: again.append(x.data_ptr()))()
    assert again == [rot.copies[0][0].data_ptr()]
    # 20 more copies of 1028 bytes need 20560 bytes, over half of 40000 free: one copy, L2 flushed instead
    made.clear()
    short = rotating(inputs, 1024, l2, free_bytes=40_000)
    assert len(short.copies) == len(made) == 1 and short.l2 == "flush"
    assert rotating(inputs, 1024, l2, free_bytes=41_120).l2 == "rotate 21 copies"  # exactly half: fits
    assert rotating(inputs, 1024, 0).l2 == "one copy"


def test_recorder_rotates_the_inputs_and_checks_on_one_copy():
    """Ours and eager each run through the copies in turn; the error check compares them on copy 0; the
    row says what it did about L2. A row that replays one set of inputs from a graph is refused."""
    used = {"ours": [], "eager": []}

    def impl(name):
        def run(x, w):
            used[name].append(x.data_ptr())
            return x * w
        return run

    rec = Recorder("kernels", Options(l2_bytes=4096))
    row = rec.add("scale", "64", {"ours": impl("ours"), "eager": impl("eager")},
                  inputs=lambda: (torch.randn(64), torch.randn(64)), bytes=1024, graph=True)
    assert row.l2 == "rotate 9 copies" and row.timer == "call" and not row.errors  # ceil(8192 / 1024) + 1
    assert len(set(used["ours"][:2])) == 2  # the call timer: a warm-up call and one timed call, two copies
    assert used["ours"][-1] == used["eager"][-1] == used["ours"][0]  # the check: copy 0 for both
    assert row.to_dict(CEIL)["l2"] == "rotate 9 copies"
    plain = Recorder("kernels", Options(shapes="real")).add(
        "scale", "64", {"ours": impl("ours"), "eager": impl("eager")},
        inputs=lambda: (torch.ones(64), torch.ones(64)), bytes=512, graph=True)
    assert plain.l2 == "one copy"  # real shapes on a CPU: no L2 size, nothing to rotate past
    assert Options().l2 == 64 << 10  # small shapes assume a nominal L2 (a few copies of their tiny rows)
    one = rec.add("stream", "64", {"ours": impl("ours")}, inputs=lambda: (torch.ones(64), torch.ones(64)), bytes=512)
    assert one.l2 == "one copy"  # not a graph row: one copy (on a GPU: do_bench, which flushes L2)
    with pytest.raises(TypeError, match="needs inputs="):
        rec.add("replay", "1", {"ours": lambda: None}, graph=True)


def test_parts_split_the_rows_and_merge_keeps_the_later_row():
    rows = {part: Recorder("kernels", Options(part=part)) for part in ("all", "headline", "rest")}
    picked = {part: [c for c, h in (("head", True), ("tail", False)) if rec.selected(c, "1", h)]
              for part, rec in rows.items()}
    assert picked == {"all": ["head", "tail"], "headline": ["head"], "rest": ["tail"]}
    first, later = _run([("decode", "1", 2.0), ("other", "1", 1.0)]), _run([("decode", "1", 3.0)])
    merged = report.merge([first, later])
    assert [(r["case"], r["ms"]["ours"]) for r in merged["rows"]] == [("decode", 3.0), ("other", 1.0)]


def _strict(text: str) -> dict:
    def no_nan(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=no_nan)


@requires_kernels
def test_bench_small_writes_json_markdown_and_plots(tmp_path):
    """The acceptance command: `autoglm-fast bench --shapes small` on a CPU-only machine, all three outputs.
    On a GPU it runs the same small shapes compiled (without the slow max-autotune compile baselines)."""
    args = [CLI, "bench", "--shapes", "small", "--require-graphs"] + (["--compile-mode", "none"] if ON_GPU else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (saved,) = (tmp_path / "bench-results").iterdir()  # the default folder: bench-results/<time>-<device>
    assert saved.name.endswith(f"-{DEVICE}")
    run = _strict((saved / "results.json").read_text())
    assert run["schema"] == report.SCHEMA and run["complete"] and run["options"]["suites"] == ["kernels", "e2e"]
    assert {"device", "torch", "triton", "python"} <= set(run["environment"]) and run["commit"] and run["date"]
    assert run["options"]["dtype"] == DTYPE
    assert run["ceilings"]["bandwidth_gbs"] > 0 and run["ceilings"]["matmul_tflops"][DTYPE] > 0
    cases = {r["case"] for r in run["rows"]}
    assert {"vision proj+LN", "audio proj+LN", "vision attention", "audio attention", "vision adapter",
            "gated fusion", "decode attention", "prefill attention", "rmsnorm+residual", "swiglu",
            "qkv bias+rope+cache", "mlp down+swiglu", "decode b1", "ttft", "throughput b2"} <= cases
    keys = [(r["suite"], r["case"], r["shape"]) for r in run["rows"]]
    # 23 kernel rows + 12 quantized (int8 / int4 x qkv, gate_up, down x 1, 17 rows) + 5 e2e + 2 quantized
    # e2e (int8 / int4 decode b1) + 3 GLM-4.1V agent-step rows + mixed arrivals, a mixed step and the agent loop
    assert len(keys) == len(set(keys)) == 48
    assert {"agent step ttft", "agent step", "mixed arrivals", "mixed step", "agent loop"} <= cases
    loop = next(r for r in run["rows"] if r["case"] == "agent loop")["metrics"]  # an agent step prefills what is new
    assert 0 < loop["ours: prefilled tokens"] < loop["ours, no prefix caching: prefilled tokens"]
    assert loop["ours: cached tokens"] > 0 == loop["ours, no prefix caching: cached tokens"]
    assert loop["ours: prefilled tokens"] + loop["ours: cached tokens"] == loop[
        "ours, no prefix caching: prefilled tokens"]
    assert {r["shape"] for r in run["rows"] if r["case"] == "decode b1"} == {
        f"nano {DTYPE}", f"nano {DTYPE}, 24 context", f"nano {DTYPE}, 48 context",
        f"glm4v-tiny {'bfloat16' if ON_GPU else DTYPE}, agent step context"}  # the released model runs bf16
    for r in run["rows"]:
        assert r["ms"]["ours"] > 0 and not r["errors"], r
        if r["suite"] == "kernels":  # every kernel row checked its output against eager on the same inputs
            assert r["metrics"]["max error vs eager"] <= TOLERANCE[DTYPE], r
        assert set(r["speedup"]) == set(r["ms"]) - {"ours"}
        # the graphed engine's state after it ran (on CUDA: captured, else the run failed --require-graphs)
        assert r["graphs"] == ({"ours": GRAPHS} if r["suite"] == "e2e" else {}), r
    decode = next(r for r in run["rows"] if r["case"] == "decode attention")
    assert decode["ms"].keys() == {"ours", "eager", "sdpa"} and decode["roofline_pct"] > 0
    # graph rows rotate copies of their inputs past the (nominal, small-shape) L2; the others flush or run once
    for r in (r for r in run["rows"] if r["case"] == "decode attention"):  # fp32 b1: ceil(2 * 64 KiB / 8448) + 1
        assert r["l2"] == f"rotate {copies_needed(r['bytes'], 64 << 10)} copies", r
    rotated = {(r["case"], r["shape"]) for r in run["rows"] if r["l2"].startswith("rotate ")}  # the graph rows
    assert rotated == {("decode attention", "b1 ctx33"), ("decode attention", "b3 ctx33"), ("swiglu", "1x152"),
                       ("qkv bias+rope+cache", "1 tokens"), ("rmsnorm+residual", "1x72"), ("gated fusion", "1 rows x 72"),
                       ("mlp down+swiglu", "1x152->72"), ("mlp down+swiglu", "33x152->72")} | {
        (r["case"], r["shape"]) for r in run["rows"] if r["case"] in ("quant gemv", "quant gemm")}  # all decode-sized
    assert {r["l2"] for r in run["rows"] if r["suite"] == "kernels"} - {r["l2"] for r in run["rows"] if (
        r["case"], r["shape"]) in rotated} <= {"flush", "one copy"}
    assert all(r["l2"] == "" for r in run["rows"] if r["suite"] == "e2e")
    assert decode["gbs"] == pytest.approx(decode["bytes"] / decode["ms"]["ours"] / 1e6)
    e2e = next(r for r in run["rows"] if r["case"] == "decode b1")
    assert {"ours", "ours, no graphs", "reference"} <= set(e2e["ms"]) and e2e["roofline_pct"] > 0
    assert e2e["roofline_pct_by_impl"]["ours"] == pytest.approx(e2e["roofline_pct"])
    assert e2e["roofline_pct_by_impl"]["reference"] == pytest.approx(
        e2e["roofline_pct"] * e2e["ms"]["ours"] / e2e["ms"]["reference"])

    md = (saved / "results.md").read_text()
    assert "## kernels" in md and "## e2e" in md and "% roofline by implementation: ours" in md
    assert re.search(r"\| (call|graph), rotate \d+ copies \|", md)  # how L2 was handled, in the timer cell
    assert f"| ours: {GRAPHS} |" in md and "CUDA GRAPHS FELL BACK" not in out.stderr
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == len(run["rows"]) + 2  # a header per suite + one line per row
    assert len({line.count("|") for line in table if "kernels" not in line}) <= 2  # one width per suite
    from PIL import Image
    for name in ("speedup.png", "roofline.png"):
        with Image.open(saved / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert f"wrote {saved / 'results.json'}".replace(str(tmp_path) + "/", "") in out.stdout
    assert re.search(r"\[kernels \+\d+ s\] gated fusion", out.stdout)  # progress lines as rows land, timed


def _run(rows, device="GPU X", commit="abc"):
    return {"schema": report.SCHEMA, "date": "2026-11-28T00:00:00+00:00", "commit": commit, "complete": True,
            "environment": {"device": device, "torch": "t", "triton": "3.6", "python": "3.12"},
            "options": {"suites": ["kernels"], "shapes": "real", "dtype": "float16", "compile_mode": "default"},
            "ceilings": {"device": device, "bandwidth_gbs": 1000.0, "matmul_tflops": {"float16": 100.0}},
            "rows": [Row("kernels", case, shape, "float16", {"ours": ms, "eager": 1.0}, bytes=10**6).to_dict(CEIL)
                     for case, shape, ms in rows]}


def test_compare_flags_only_regressions_over_the_threshold(tmp_path, capsys):
    base = _run([("a", "1", 1.0), ("b", "1", 1.0), ("c", "1", 1.0), ("gone", "1", 1.0)])
    now = _run([("a", "1", 1.10), ("b", "1", 1.03), ("c", "1", 0.5), ("new", "1", 1.0)])
    text, regressions = report.compare(now, base, 0.05)
    assert [(r["case"], r["ms"]) for r in regressions] == [("a", 1.10)]
    assert "REGRESSION (+10.0 %)" in text and "2.00x" in text and "0.97x" in text
    assert "new" in text and "gone 1" in text and "1 regression(s) over 5 %" in text
    assert len(report.compare(now, base, 0.15)[1]) == 0
    report.write_json(base, tmp_path / "base.json")
    report.write_json(now, tmp_path / "now.json")
    args = ["--load", str(tmp_path / "now.json"), "--compare", str(tmp_path / "base.json")]
    assert bench_main(args) == 0
    assert bench_main(args + ["--fail-on-regression"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert bench_main(["--load", str(tmp_path / "now.json"), "--out", str(tmp_path / "again")]) == 0
    assert _strict((tmp_path / "again" / "results.json").read_text())["rows"] == _strict(
        (tmp_path / "now.json").read_text())["rows"] and (tmp_path / "again" / "plots" / "roofline.png").exists()
    other = _run([("a", "1", 1.0)], device="GPU Y")
    assert "different devices" in report.compare(other, base)[0]


def test_a_cuda_graph_fallback_is_flagged_and_fails_require_graphs(tmp_path, capsys):
    run = _run([("a", "1", 1.0)])
    e2e = [Row("e2e", case, "9b", "float16", {"ours": 5.0, "reference": 50.0}, timer="engine",
               graphs={"ours": status}).to_dict(CEIL) for case, status in (("decode b1", "fallback"),
                                                                          ("ttft", "captured"))]
    run["rows"] += e2e + [Row("e2e", "throughput b8", "9b", "float16", {"ours": 1.0}, graphs={"ours": "pending"},
                              timer="engine").to_dict(CEIL)]
    assert report.graph_fallbacks(run) == ["e2e decode b1 9b: ours fallback", "e2e throughput b8 9b: ours pending"]
    md = report.markdown(run)
    assert "| **ours: fallback** | engine |" in md and "| ours: captured | engine |" in md
    assert "CUDA graphs" in md.split("## e2e")[1] and "CUDA graphs" not in md.split("## e2e")[0].split("## kernels")[1]
    report.write_json(run, tmp_path / "run.json")
    assert _strict((tmp_path / "run.json").read_text())["rows"][1]["graphs"] == {"ours": "fallback"}
    assert bench_main(["--load", str(tmp_path / "run.json")]) == 0  # said, but no failure unless asked for
    assert "CUDA GRAPHS FELL BACK" in capsys.readouterr().err
    assert bench_main(["--load", str(tmp_path / "run.json"), "--require-graphs"]) == 1
    assert "e2e decode b1 9b: ours fallback" in capsys.readouterr().err
    for row in run["rows"][1:]:  # captured on a GPU, off on a CPU (no CUDA): neither is a fallback
        row["graphs"] = {"ours": "off" if row["case"] == "ttft" else "captured"}
    report.write_json(run, tmp_path / "ok.json")
    assert report.graph_fallbacks(run) == []
    assert bench_main(["--load", str(tmp_path / "ok.json"), "--require-graphs"]) == 0
    assert "FELL BACK" not in capsys.readouterr().err


def test_saved_runs_merge_and_render_and_partial_runs_say_so(tmp_path):
    kernels, e2e = _run([("a", "1", 1.0)], commit="abc"), _run([("b", "2", 2.0)], commit="abc")
    e2e["complete"], e2e["options"]["suites"] = False, ["e2e"]
    merged = report.merge([kernels, e2e])
    assert [r["case"] for r in merged["rows"]] == ["a", "b"] and merged["options"]["suites"] == ["kernels", "e2e"]
    assert not merged["complete"] and "incomplete run" in report.markdown(merged)
    # each part's own compile mode and ceilings stay beside its suites (not the first part's for all)
    e2e["options"]["compile_mode"] = "max-autotune-no-cudagraphs"
    md = report.markdown(report.merge([kernels, e2e]))
    assert f"kernels: shapes `real` · dtype float16 · torch.compile mode `{kernels['options']['compile_mode']}`" in md
    assert "e2e: shapes `real` · dtype float16 · torch.compile mode `max-autotune-no-cudagraphs`" in md
    with pytest.raises(ValueError, match="cannot merge"):
        report.merge([kernels, _run([], device="GPU Y")])
    bad = Row("kernels", "x", "1", "float16", {"ours": float("nan")}, bytes=1).to_dict(CEIL)
    report.write_json(_run([]) | {"rows": [bad]}, tmp_path / "nan.json")
    assert _strict((tmp_path / "nan.json").read_text())["rows"][0]["ms"]["ours"] is None
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_arguments_get_clear_errors(tmp_path, capsys, monkeypatch):
    if not torch.cuda.is_available():
        assert bench_main(["--shapes", "real"]) == 2
        assert "--shapes real needs a CUDA GPU" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"rows": []}')
    assert bench_main(["--load", str(tmp_path / "other.json")]) == 2
    assert "not an autoglm-fast benchmark run" in capsys.readouterr().err
    assert bench_main(["--load", str(tmp_path / "missing.json")]) == 2
    assert "cannot read benchmark results" in capsys.readouterr().err
    assert bench_main(["--load", str(tmp_path / "other.json"), "--threshold", "-1"]) == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    assert bench_main(["--suite", "kernels", "--plot", str(tmp_path)]) == 2
    assert "pip install 'autoglm-fast[bench]'" in capsys.readouterr().err
    assert subprocess.run([sys.executable, "-m", "autoglm_fast.benchmarks", "--help"], capture_output=True,
                          text=True, timeout=60).stdout.count("--compare") >= 1
