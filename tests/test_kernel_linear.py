"""fused_linear (GEMM + bias + GELU / residual / LayerNorm epilogue) vs its eager reference."""
import pytest
import torch

from autoglm_fast.kernels.linear import fused_linear, reference_linear
from kernel_harness import DEVICE, DOT_DTYPES, assert_matches, nan_like, odd_sizes, randn, requires_kernels

pytestmark = requires_kernels
EPILOGUES = ["none", "gelu", "residual", "layernorm"]


def _inputs(M, N, K, dtype):
    torch.manual_seed(M * 1000 + N + K)
    return dict(x=randn(M, K, dtype=dtype), weight=randn(N, K, dtype=dtype, scale=K ** -0.5),
                bias=randn(N, dtype=dtype), residual=randn(M, N, dtype=dtype),
                ln_weight=randn(N, dtype=dtype), ln_bias=randn(N, dtype=dtype))


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("M", odd_sizes(4))
@pytest.mark.parametrize("N, K", [(56, 30), (512, 384)])
def test_matches_reference(dtype, epilogue, M, N, K):
    a = _inputs(M, N, K, dtype)
    out = nan_like((M, N), dtype)
    got = fused_linear(a["x"], a["weight"], a["bias"], epilogue=epilogue, residual=a["residual"],
                       ln_weight=a["ln_weight"], ln_bias=a["ln_bias"], out=out)
    assert got is out
    assert_matches(got, reference_linear, a["x"], a["weight"], a["bias"], epilogue=epilogue, residual=a["residual"],
                   ln_weight=a["ln_weight"], ln_bias=a["ln_bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_leading_dims_and_no_bias(dtype):
    x = randn(3, 5, 24, dtype=dtype)
    w = randn(40, 24, dtype=dtype, scale=0.2)
    assert_matches(fused_linear(x, w), reference_linear, x, w)
    assert_matches(fused_linear(x, w, epilogue="gelu"), reference_linear, x, w, epilogue="gelu")


def test_bad_inputs_name_the_argument():
    x, w, b = randn(4, 8), randn(6, 8), randn(6)
    with pytest.raises(ValueError, match="x must have a unit stride in its last dimension"):
        fused_linear(randn(8, 4).t(), w)
    with pytest.raises(ValueError, match="x with shape .* cannot be viewed as rows"):
        fused_linear(randn(4, 3, 8).transpose(0, 1), w)  # rows exist, but not as one strided run
    with pytest.raises(ValueError, match="weight must have a unit stride"):
        fused_linear(x, randn(8, 6).t())
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but the input is torch.float32"):
        fused_linear(x, w.half())
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        fused_linear(torch.ones(4, 8, dtype=torch.long, device=DEVICE), w)
    with pytest.raises(ValueError, match="x is on meta"):
        fused_linear(torch.empty(4, 8, device="meta"), w)
    with pytest.raises(ValueError, match="last dimension must be weight's K=8"):
        fused_linear(randn(4, 9), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear(x, w, randn(5))
    with pytest.raises(ValueError, match="needs residual"):
        fused_linear(x, w, b, epilogue="residual")
    with pytest.raises(ValueError, match="needs ln_weight and ln_bias"):
        fused_linear(x, w, b, epilogue="layernorm")
    with pytest.raises(ValueError, match="epilogue must be one of"):
        fused_linear(x, w, b, epilogue="relu")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fused_linear([[1.0]], w)
