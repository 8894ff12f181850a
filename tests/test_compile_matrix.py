"""Every kernel compiles for sm_80 (A100), sm_89 (RTX 4090) and sm_90 (H100/H200) on this GPU-less
machine, at each config its launcher can pick and specialized as a launch at the real shapes is:
shared memory within the target's limit, no register spills in the hot kernels, and the memory-bound
kernels get 128-bit global accesses. The table is printed into the test log."""
import json

import pytest

from autoglm_fast.benchmarks import compile_report
from autoglm_fast.kernels import compile_matrix as cm
from autoglm_fast.kernels.compile_matrix import REPORT_KEYS, TARGETS, compile_all, format_table, ptx_facts
from autoglm_fast.kernels.specs import CompileSpec


@pytest.fixture(scope="module")
def results():
    return compile_all()


def test_every_kernel_compiles_for_every_target(results, capsys):
    with capsys.disabled():
        print("\n" + format_table(results))
    failed = [f"{r.kernel} [{r.config}] on {r.target}: {'; '.join(r.errors)}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


def test_matrix_covers_every_kernel_and_target(results):
    kernels = {r.kernel for r in results}
    assert kernels == {"linear+gelu", "linear+residual", "linear+layernorm", "adapter_attention", "gated_fusion",
                       "fusion_summary", "rms_norm", "swiglu", "qkv_rope_cache", "paged_prefill_attention",
                       "paged_decode_attention", "vision_rope", "swiglu_down", "quant_gemv int8", "quant_gemv int4",
                       "quant_gemm int8", "quant_gemm int4"}
    for k in kernels:
        assert {r.target for r in results if r.kernel == k} == set(TARGETS)


def test_memory_bound_kernels_move_rows_in_128_bit_accesses(results):
    """At the real shapes (H=3584, I=26880: multiples of 16, aligned rows) a launch vectorizes the row
    loads and stores; compiled without the ints' specialization they are 16-bit scalars."""
    for r in results:
        if r.kernel in ("rms_norm", "swiglu", "gated_fusion") and r.target == "sm_90":
            assert r.global_loads.get("128", 0) >= 2 and r.global_stores.get("128", 0) >= 1, (r.kernel, r.config)
        if r.kernel in ("rms_norm", "swiglu"):
            assert set(r.global_loads) == set(r.global_stores) == {"128"}, (r.kernel, r.config, r.target)


def test_tensor_core_kernels_use_mma(results):
    for r in results:
        if r.kernel.startswith(("linear", "paged_prefill", "paged_decode_attention", "adapter_attention",
                                "swiglu_down")):
            assert r.mma in (("wgmma", "mma.sync") if r.target == "sm_90" else ("mma.sync",)), (r.kernel, r.config)
        if r.kernel in ("rms_norm", "swiglu", "gated_fusion"):
            assert r.mma == "none" and r.tma == 0


def test_prefill_uses_wgmma_on_sm_90(results):
    """Hopper's warpgroup MMA for every prefill tile of 64+ query rows, the sm_90-only 128x128 one included."""
    rows = [r for r in results if r.kernel == "paged_prefill_attention" and r.target == "sm_90"]
    assert any("128x128" in r.config for r in rows)
    for r in rows:
        if not r.config.split()[1].startswith("32x"):
            assert r.mma == "wgmma", (r.config, r.mma)


def _spec(kernel: str, label_part: str = "") -> CompileSpec:
    return next(s for s in cm.all_specs() if s.kernel == kernel and label_part in s.label)


def _attrs_of(spec, name, specialization):
    signature, constexprs, attrs = specialization
    return signature[name], attrs.get((list(signature).index(name),), [])


@pytest.mark.parametrize("portable", [False, True])
def test_specialization_follows_the_argument_values(portable):
    """Triton's rules: an int divisible by 16 (H=3584) gets tt.divisibility 16, an int equal to 1 becomes a
    constant (decode's num_splits, the fusion's T=1), others stay plain; tensors are 16-byte aligned."""
    rms = _spec("rms_norm")
    sp = cm.specialize(rms, portable=portable)
    assert rms.args["H"] == 3584
    assert _attrs_of(rms, "H", sp) == ("i32", [["tt.divisibility", 16]])
    assert _attrs_of(rms, "x_ptr", sp) == ("*fp16", [["tt.divisibility", 16]])
    assert _attrs_of(rms, "eps", sp) == ("fp32", [])
    single = _spec("paged_decode_attention", "single")
    signature, constexprs, _ = cm.specialize(single, portable=portable)
    assert signature["num_splits"] == "constexpr"
    assert constexprs[(list(signature).index("num_splits"),)] == 1
    attn = _spec("adapter_attention")
    assert _attrs_of(attn, "L", cm.specialize(attn, portable=portable)) == ("i32", [])  # 375
    inline = _spec("gated_fusion", "inline")
    assert cm.specialize(inline, portable=portable)[0]["T"] == "constexpr"


def test_portable_specialization_agrees_with_tritons_launcher():
    for spec in cm.all_specs():
        assert cm.specialize(spec, portable=True) == cm.specialize(spec), (spec.kernel, spec.label)


def test_specs_name_every_argument():
    spec = _spec("swiglu")
    del spec.args["stride_y"]
    with pytest.raises(ValueError, match="stride_y"):
        cm.specialize(spec)
    spec = _spec("swiglu")
    spec.args["stride_z"] = 16
    with pytest.raises(ValueError, match="stride_z"):
        cm.specialize(spec)


PTX = """
    // ld.global.v4.b32 in a comment is not an instruction
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.nc.L1::evict_last.b16 %rs1, [ %rd2 + 0 ];
    @!%p2 ld.global.v2.f32 { %f1, %f2 }, [ %rd3 + 0 ];
    ld.global.b16 %rs2, [ %rd4 + 2 ];
    ld.shared.v4.b32 { %r5, %r6, %r7, %r8 }, [ %r9 + 0 ];
    @%p1 st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
    st.global.b8 [ %rd6 + 0 ], %rs3;
    cp.async.cg.shared.global [ %r10 + 0 ], [ %rd7 + 0 ], 0x10, %r11;
    cp.async.commit_group;
    cp.async.wait_group 0;
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r12], [%rd8, {%r13, %r14}], [%r15];
    cp.async.bulk.commit_group;
    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 { %f3, %f4, %f5, %f6 }, { %r1, %r2, %r3, %r4 }, { %r5, %r6 }, {};
"""


def test_ptx_counter():
    facts = ptx_facts(PTX)
    assert facts == {"global_loads": {"16": 2, "64": 1, "128": 1}, "global_stores": {"8": 1, "128": 1},
                     "mma": "mma.sync", "cp_async": 1, "tma": 1}
    wgmma = "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;\n"
    assert ptx_facts(PTX + wgmma)["mma"] == "wgmma"
    assert ptx_facts("ld.global.b32 %r1, [%rd1];")["mma"] == "none"


def test_json_report_has_exactly_the_documented_keys(results, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compile_report, "compile_all", lambda kernels, targets: results)
    path = tmp_path / "report.json"
    assert compile_report.main(["--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert len(rows) == len(results)
    assert all(list(row) == list(REPORT_KEYS) for row in rows)
    assert set(REPORT_KEYS) == {"kernel", "config", "target", "registers", "spill_bytes", "smem_bytes", "global_loads",
                                "global_stores", "mma", "cp_async", "tma"}
    swiglu = next(r for r in rows if r["kernel"] == "swiglu" and r["target"] == "sm_90")
    assert swiglu["global_loads"] == {"128": 2} and swiglu["mma"] == "none"
    assert "2x128" in capsys.readouterr().out  # the table shows the widths too
