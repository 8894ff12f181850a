"""The benchmark runner works (smoke mode, interpreter on CPU) and its roofline arithmetic is right."""
import json

import pytest

from autoglm_fast.benchmarks.common import Ceilings, Row
from kernel_harness import requires_kernels


def test_roofline_arithmetic_with_known_numbers():
    c = Ceilings("test", bandwidth_gbs=1000.0, matmul_tflops=100.0)
    mem = Row("copy-like", "-", {"ours": 2.0, "eager": 4.0, "compile": 3.0}, bytes=10**9, flops=10**9)
    d = mem.to_dict(c)
    assert mem.roofline_ms(c) == pytest.approx(1.0)          # 1 GB at 1000 GB/s = 1 ms > 1 GFLOP at 100 TFLOP/s
    assert d["roofline_pct"] == pytest.approx(50.0) and d["gbs"] == pytest.approx(500.0)
    assert d["speedup"] == {"eager": pytest.approx(2.0), "compile": pytest.approx(1.5)}
    compute = Row("gemm", "-", {"ours": 0.5}, bytes=10**6, flops=4 * 10**10)
    assert compute.roofline_ms(c) == pytest.approx(0.4)      # compute bound: 40 GFLOP at 100 TFLOP/s
    assert compute.to_dict(c)["tflops"] == pytest.approx(80.0)


@requires_kernels
def test_adapter_runner_smoke(tmp_path):
    from autoglm_fast.benchmarks import adapter
    assert adapter.main(["--smoke", "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    cases = {r["case"] for r in out["rows"]}
    assert {"vision proj+LN", "audio proj+LN", "vision attention", "vision adapter", "gated fusion"} <= cases
    assert all(r["ms"]["ours"] > 0 and r["ms"]["eager"] > 0 for r in out["rows"])


@requires_kernels
def test_backbone_runner_smoke(tmp_path):
    from autoglm_fast.benchmarks import backbone
    assert backbone.main(["--smoke", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert {"decode attention", "prefill attention", "rmsnorm+residual", "swiglu"} <= {r["case"] for r in rows}
    assert all(r["ms"]["ours"] > 0 and r["ms"]["eager"] > 0 for r in rows)


def test_e2e_runner_smoke(tmp_path):
    from autoglm_fast.benchmarks import e2e
    assert e2e.main(["--smoke", "--backend", "reference", "--json", str(tmp_path / "out.json")]) == 0
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["preset"] == "nano" and r["ttft_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert r["tokens_per_s_batch2"] > 0
