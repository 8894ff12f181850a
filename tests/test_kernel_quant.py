"""Weight-only int8 / int4 linear: quant_gemv (decode, split-K) and quant_gemm (prefill) vs dequantize-then-
F.linear (reference_quant_linear), the formats' round trips, the launchers' errors and the compiled GEMV.
Every output is NaN-prefilled; every config of both kernels is forced once."""
import pytest
import torch
import triton

from autoglm_fast.kernels import quant_gemm as gemm_mod, quant_gemv as gemv_mod
from autoglm_fast.kernels.compile_matrix import TARGETS, compile_all, format_table
from autoglm_fast.kernels.quant import (GEMV_MAX_ROWS, dequantize, pack_int4, quant_linear, quantize_int4,
                                        quantize_int8, reference_quant_linear, unpack_int4)
from autoglm_fast.kernels.quant_gemm import quant_gemm
from autoglm_fast.kernels.quant_gemv import quant_gemv
from autoglm_fast.kernels.utils import interpreting, split_counters
from kernel_harness import (DEVICE, assert_matches, assert_within, bf16_dot, nan_like, randn, reference_pair,
                            requires_kernels, tolerance_failures)

pytestmark = requires_kernels

# (bits, group, N, K, bias): the 9B's shapes scaled down, plus odd ones. int8 takes any K; int4 K is a
# multiple of the group size (96 = 3 groups of 32).
CASES = [(8, None, 67, 256, True), (8, None, 1, 96, False), (8, None, 128, 200, True), (8, None, 33, 7, False),
         (4, 32, 67, 96, True), (4, 64, 1, 256, False), (4, 128, 128, 256, False), (4, 128, 67, 128, True)]
CASE_IDS = [f"int{b}{'-g' + str(g) if g else ''}-{n}x{k}{'-bias' if bias else ''}" for b, g, n, k, bias in CASES]


def _rows_dtypes(rows, dot_rows):
    """(M, dtype) pairs; bf16 on a GPU only at the rows that take tl.dot (M = 1 sums rows in fp32)."""
    return [pytest.param(m, d, marks=pytest.mark.gpu if d is torch.bfloat16 and m in dot_rows else (),
                         id=f"M{m}-{str(d).removeprefix('torch.')}")
            for m in rows for d in (torch.float32, torch.float16, torch.bfloat16)]


def quantized(bits, N, K, group, dtype, seed=0):
    """(qweight, scales, zeros) of a random [N, K] weight; int4 scales in the model's dtype."""
    torch.manual_seed(seed)
    w = randn(N, K, scale=K ** -0.5)
    if bits == 8:
        return (*quantize_int8(w), None)
    return quantize_int4(w, group, scale_dtype=dtype)


def assert_matches_linear(out, *args, **kwargs):
    """`out` against reference_quant_linear(*args, **kwargs). One output channel (N = 1) is judged as one row
    of M: a lone element's rounding error has nothing to average with."""
    exact, eager = reference_pair(reference_quant_linear, *args, **kwargs)
    if out.shape[-1] == 1:
        out, exact, eager = (t.reshape(1, -1) for t in (out, exact, eager))
    assert_within(out, exact, eager)


def inputs(M, K, N, dtype, bias, seed=1):
    torch.manual_seed(seed)
    return randn(M, K, dtype=dtype), randn(N, dtype=dtype) if bias else None


@pytest.mark.parametrize("M, dtype", _rows_dtypes((1, 7, 16), dot_rows=(7, 16)))
@pytest.mark.parametrize("bits, group, N, K, bias", CASES, ids=CASE_IDS)
def test_gemv_matches_reference(M, dtype, bits, group, N, K, bias):
    if dtype is torch.bfloat16 and M == N == 1 and interpreting():
        pytest.skip("the interpreter truncates fp32 -> bf16: a lone output can be an ulp off (checked on a GPU)")
    q, s, z = quantized(bits, N, K, group, dtype)
    x, b = inputs(M, K, N, dtype, bias)
    out = nan_like((M, N), dtype)
    assert quant_gemv(x, q, s, z, b, out=out) is out
    assert_matches_linear(out, x, q, s, z, b)


@pytest.mark.parametrize("M, dtype", _rows_dtypes((33, 128), dot_rows=(33, 128)))
@pytest.mark.parametrize("bits, group, N, K, bias", CASES, ids=CASE_IDS)
def test_gemm_matches_reference(M, dtype, bits, group, N, K, bias):
    q, s, z = quantized(bits, N, K, group, dtype)
    x, b = inputs(M, K, N, dtype, bias)
    out = nan_like((M, N), dtype)
    assert quant_gemm(x, q, s, z, b, out=out) is out
    assert_matches_linear(out, x, q, s, z, b)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), bf16_dot])
@pytest.mark.parametrize("key", list(gemv_mod.CONFIGS), ids=lambda k: f"int{k[0]}-M{k[1]}")
def test_gemv_every_config_forced(key, dtype):
    """Each config at its rows (the 16-row dot tile with 1 row too), one split and four."""
    bits, rows = key
    cfg = gemv_mod.CONFIGS[key]
    q, s, z = quantized(bits, 70, 512, 128, dtype)
    for M in ((1,) if rows == 1 else (1, 9, 16)):
        x, b = inputs(M, 512, 70, dtype, bias=True)
        exact, eager = reference_pair(reference_quant_linear, x, q, s, z, b)
        for splits in (1, 4):
            assert_within(quant_gemv(x, q, s, z, b, out=nan_like((M, 70), dtype), config=cfg, splits=splits),
                          exact, eager)
    assert not split_counters(DEVICE, per_stream=True).any()


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), bf16_dot])
@pytest.mark.parametrize("index", range(len(gemm_mod.CONFIGS)), ids=lambda i: f"M<={gemm_mod.CONFIGS[i][0]}")
@pytest.mark.parametrize("bits, group", [(8, None), (4, 128), (4, 64)], ids=["int8", "int4-g128", "int4-g64"])
def test_gemm_every_config_forced(index, bits, group, dtype):
    cfg = gemm_mod.CONFIGS[index][1]
    if bits == 4 and group % cfg.kwargs["BLOCK_K"]:
        cfg = gemm_mod.gemm_config(bits, gemm_mod.CONFIGS[index][0] or 10 ** 6, group)  # as the launcher caps it
    q, s, z = quantized(bits, 130, 256, group, dtype)
    x, b = inputs(45, 256, 130, dtype, bias=True)
    out = nan_like((45, 130), dtype)
    assert quant_gemm(x, q, s, z, b, out=out, config=cfg) is out
    assert_matches(out, reference_quant_linear, x, q, s, z, b)


@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize("bits, group, K", [(8, None, 200), (4, 64, 256)], ids=["int8", "int4-g64"])
def test_split_counts_agree_and_counters_reset(bits, group, K, M):
    """A forced 32-wide K step: 1 split; 3, whose last split is short (K=200: 8 columns of 96; K=256: 64); 7
    (int8: again 8 columns last); 16, clamped to one step per split. The merges leave every counter at 0."""
    dtype = torch.float16
    cfg = triton.Config({"BLOCK_M": 1 if M == 1 else 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)
    q, s, z = quantized(bits, 67, K, group, dtype)
    x, b = inputs(M, K, 67, dtype, bias=True)
    exact, eager = reference_pair(reference_quant_linear, x, q, s, z, b)
    for splits in (1, 3, 7, 16):
        assert_within(quant_gemv(x, q, s, z, b, out=nan_like((M, 67), dtype), config=cfg, splits=splits),
                      exact, eager)
    assert not split_counters(DEVICE, per_stream=True).any()


@pytest.mark.parametrize("M, dtype", _rows_dtypes((1, 7), dot_rows=(7,)))
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)], ids=["int8", "int4-g32"])
def test_gemv_fused_swiglu_input(M, dtype, bits, group):
    """x is the gate_up output [M, 2K]; the GEMV reads silu(gate) * up (at its default split count), directly
    and through quant_linear."""
    q, s, z = quantized(bits, 67, 96, group, dtype)
    torch.manual_seed(2)
    gate_up, b = randn(M, 2 * 96, dtype=dtype), randn(67, dtype=dtype)
    out = nan_like((M, 67), dtype)
    assert quant_gemv(gate_up, q, s, z, b, out=out, swiglu=True) is out
    assert_matches(out, reference_quant_linear, gate_up, q, s, z, b, swiglu=True)
    assert_matches(quant_linear(gate_up, q, s, z, swiglu=True), reference_quant_linear, gate_up, q, s, z, swiglu=True)
    assert not split_counters(DEVICE, per_stream=True).any()


@pytest.mark.parametrize("lead, kernel", [((2, 8), "quant_gemv"), ((17,), "quant_gemm")])
def test_dispatcher_picks_the_gemv_up_to_16_rows(lead, kernel, monkeypatch):
    calls = []

    def spy(name, fn):
        def launch(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return launch
    for mod, name in ((gemv_mod, "quant_gemv"), (gemm_mod, "quant_gemm")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    q, s, z = quantized(4, 67, 128, 64, torch.float16)
    torch.manual_seed(3)
    x = randn(*lead, 128, dtype=torch.float16)
    out = nan_like((*lead, 67), torch.float16)
    assert quant_linear(x, q, s, z, out=out) is out
    assert calls == [kernel] and GEMV_MAX_ROWS == 16
    assert_matches(out, reference_quant_linear, x, q, s, z)
    assert quant_linear(x, q, s, z).shape == out.shape  # without out=


def test_perturbed_outputs_fail_the_tolerance():
    """The tolerance these tests use rejects an all-zeros output, a 1 % scale error and one K group of the
    weights dropped (its codes set to the zero point), at both kernels."""
    dtype, N, K, group = torch.float16, 67, 256, 32
    q, s, z = quantized(4, N, K, group, dtype)
    codes = unpack_int4(q)
    codes[:, group:2 * group] = z[1][:, None]  # group 1 dequantizes to 0
    dropped = pack_int4(codes)
    for M, kernel in ((7, quant_gemv), (33, quant_gemm)):
        x, b = inputs(M, K, N, dtype, bias=True)
        exact, eager = reference_pair(reference_quant_linear, x, q, s, z, b)
        got = kernel(x, q, s, z, b, out=nan_like((M, N), dtype))
        assert not tolerance_failures(got, exact, eager)
        for bad in (torch.zeros_like(got), got * 1.01, kernel(x, dropped, s, z, b, out=nan_like((M, N), dtype))):
            assert tolerance_failures(bad, exact, eager)


# ---- formats --------------------------------------------------------------------------------------------
def test_pack_int4_and_unpack_are_inverse():
    torch.manual_seed(4)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[0, 0], codes[0, 0] | codes[0, 1] << 4)  # k = 2j low nibble, 2j + 1 high
    raw = torch.randint(0, 256, (3, 16), dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(raw)), raw)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group, scale_dtype):
    """Round to nearest: every weight within half its group's step, plus rounding: the stored step spans 15
    codes up to half an eps of its dtype (the top code may clamp: 7.5 eps), and the fp32 dequantization. A
    weight of 0 dequantizes to exactly 0 (its code is the zero point)."""
    torch.manual_seed(group)
    w = torch.randn(9, 4 * group)
    w[:, ::7] = 0.0
    q, s, z = quantize_int4(w, group, scale_dtype=scale_dtype)
    assert q.dtype == z.dtype == torch.uint8 and s.dtype == scale_dtype and s.shape == z.shape == (4, 9)
    err = (dequantize(q, s, z) - w).abs().reshape(9, 4, group)
    step = s.float().t()[..., None]
    fp32 = w.abs().reshape(9, 4, group) * 2 * torch.finfo(torch.float32).eps
    assert (err <= step * (0.5 + 8 * torch.finfo(scale_dtype).eps) + fp32).all()
    assert (dequantize(q, s, z)[:, ::7] == 0).all()


def test_int8_round_trip_within_half_a_step():
    torch.manual_seed(5)
    w = torch.randn(11, 37)
    w[:, ::5] = 0.0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (1, 11) and q.abs().max() == 127
    err = (dequantize(q, s) - w).abs()
    assert (err <= s.t() / 2 + w.abs() * 2 * torch.finfo(torch.float32).eps).all()
    assert (dequantize(q, s)[:, ::5] == 0).all()


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("launch", [quant_gemv, quant_gemm, quant_linear])
def test_bad_inputs_name_the_argument(launch):
    N, K = 8, 64
    q8, s8, _ = quantized(8, N, K, None, torch.float16)
    q4, s4, z4 = quantized(4, N, K, 32, torch.float16)
    x = randn(2, K, dtype=torch.float16)
    with pytest.raises(TypeError, match="qweight must be int8"):
        launch(x, q8.half(), s8)
    with pytest.raises(TypeError, match="scales must be floating point"):
        launch(x, q8, s8.to(torch.int32))
    with pytest.raises(ValueError, match=r"int8 scales must have shape \(1, 8\)"):
        launch(x, q8, s8.t())
    with pytest.raises(ValueError, match="int4 scales must have shape"):
        launch(x, q4, s4[:, :3], z4)
    with pytest.raises(ValueError, match="int4 zeros must be a uint8 tensor"):
        launch(x, q4, s4)
    with pytest.raises(ValueError, match="int8 weights are symmetric: zeros must be None"):
        launch(x, q8, s8, z4)
    with pytest.raises(ValueError, match="group_size must be one of"):  # 4 groups of 16
        launch(x, q4, torch.cat([s4, s4]), torch.cat([z4, z4]))
    with pytest.raises(ValueError, match="x has shape .*last dimension must be"):
        launch(randn(2, K + 1, dtype=torch.float16), q8, s8)
    padded = torch.zeros(N, K + 16, dtype=torch.int8, device=DEVICE)[:, :K]
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        launch(x, padded, s8)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        launch(x, q8, s8, None, randn(N + 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must have shape"):
        launch(x, q8, s8, out=nan_like((2, N + 1), torch.float16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        launch([[1.0] * K], q8, s8)


def test_gemv_and_configs_refuse_what_they_cannot_take():
    q, s, z = quantized(4, 8, 128, 64, torch.float16)
    with pytest.raises(ValueError, match="17 rows > GEMV_MAX_ROWS = 16"):
        quant_gemv(randn(17, 128, dtype=torch.float16), q, s, z)
    with pytest.raises(ValueError, match="cannot take 2 rows"):
        quant_gemv(randn(2, 128, dtype=torch.float16), q, s, z, config=gemv_mod.CONFIGS[(4, 1)])
    with pytest.raises(ValueError, match="cannot take group_size 64"):  # BLOCK_K 128 > the group
        quant_gemm(randn(20, 128, dtype=torch.float16), q, s, z, config=gemm_mod.CONFIGS[0][1])
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(randn(8, 64), 16)
    with pytest.raises(ValueError, match="in_features=96 is not a multiple of group_size=64"):
        quantize_int4(randn(8, 96), 64)


# ---- the compiled GEMV ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    return compile_all(kernels=["quant_gemv int8", "quant_gemv int4"], workers=1)


def test_compiled_gemv_streams_weights_in_128_bit_loads_without_spills(compiled, capsys):
    """At the 9B's shapes every GEMV config compiles on sm_80/89/90 without spills; one row streams the
    weights with 128-bit global loads and row sums (no tensor cores), up to 16 rows pipeline them into an MMA."""
    with capsys.disabled():
        print("\n" + format_table(compiled))
    assert {r.target for r in compiled} == set(TARGETS)
    assert len(compiled) == len(gemv_mod.compile_specs()) * len(TARGETS)
    for r in compiled:
        assert r.ok and r.spill_bytes == 0, (r.kernel, r.config, r.target, r.errors)
        if " M=1 " in r.config:
            assert r.global_loads.get("128", 0) >= 1 and r.mma == "none", (r.kernel, r.config, r.target)
        else:
            assert r.mma != "none" and r.cp_async > 0, (r.kernel, r.config, r.target)
