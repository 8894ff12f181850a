"""What every kernel test shares: NaN-prefilled outputs, dtype tolerances scaled with the reduction
length, odd shapes, and skips for where kernels (or bf16 dots) cannot run."""
from __future__ import annotations

import math

import pytest
import torch

from autoglm_fast.kernels.utils import interpreting

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
RTOL = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6}

requires_kernels = pytest.mark.skipif(not (ON_GPU or interpreting()),
                                      reason="needs a CUDA GPU or TRITON_INTERPRET=1 (make test sets it)")
# The interpreter's bf16 tl.dot returns garbage: kernels that multiply bf16 tiles are checked on a GPU only.
bf16_dot = pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16")
DOT_DTYPES = [torch.float32, torch.float16, bf16_dot]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def odd_sizes(k: int) -> list[int]:
    """1, 2^k and 2^k + 17: a single element, a power of two, and one that crosses block edges."""
    return [1, 2 ** k, 2 ** k + 17]


def nan_like(shape, dtype: torch.dtype) -> torch.Tensor:
    """Output buffer prefilled with NaN, so an element the kernel fails to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def tolerances(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    """(rtol, atol): atol grows with sqrt(reduction length), as rounding errors of a sum do."""
    rtol = RTOL[dtype]
    return rtol, rtol * max(1.0, math.sqrt(reduction))


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, reduction: int = 1) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert not got.isnan().any(), "NaN in the output: an element was not written"
    rtol, atol = tolerances(dtype, reduction)
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)


def randn(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)
