"""What every kernel test shares: NaN-prefilled outputs, odd shapes, skips for where kernels (or bf16 dots)
cannot run, and the one rule every result is judged by.

The rule (FlashAttention's): the *exact* answer is the eager reference run in fp64; the *eager* answer is
the same reference run in the kernel's dtype. A kernel's error against the exact answer may be at most
FACTOR times the eager answer's error, plus a floor that is a small fraction of the answer's size:

- per row (the last dimension: a head, a hidden vector): rms(got - exact) <= FACTOR * rms(eager - exact)
  + FLOOR * rms(exact), so a wrong row fails even when the rest of the tensor is right;
- over the tensor: max|got - exact| <= FACTOR * max|eager - exact| + FLOOR * max|exact|.

Rounding errors scale with the answer, not with the reduction length, so an all-zeros output, a 1 % scale
error or a dropped key fails at any shape; tests/test_tolerance.py checks that at every real shape.
"""
from __future__ import annotations

import copy

import pytest
import torch

from autoglm_fast.kernels.utils import interpreting

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

FACTOR = 3.0
# Half precision: a quarter ulp of the row's size, for rows the eager reference happens to get exact. fp32:
# eager and kernel differ mainly in summation order and exp vs exp2, a few ulps either way.
FLOOR = {torch.float16: torch.finfo(torch.float16).eps / 4, torch.bfloat16: torch.finfo(torch.bfloat16).eps / 4,
         torch.float32: 16 * torch.finfo(torch.float32).eps}

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


def randn(*shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def upcast(x):
    """fp64 copies of every floating tensor (and module) in x, recursively; everything else as is."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64, copy=True) if x.is_floating_point() else x
    if isinstance(x, torch.nn.Module):
        return copy.deepcopy(x).to(torch.float64)
    if isinstance(x, (list, tuple)):
        return type(x)(upcast(v) for v in x)
    if isinstance(x, dict):
        return {k: upcast(v) for k, v in x.items()}
    return x


def reference_pair(fn, *args, **kwargs) -> tuple:
    """(exact, eager): `fn` (a function or a module, copied to fp64) on fp64 copies of its inputs, and as is."""
    return upcast(fn)(*upcast(args), **upcast(kwargs)), fn(*args, **kwargs)


def default_factor(got: torch.Tensor) -> float:
    """FACTOR; twice that for bf16 out of the interpreter, whose fp32 -> bf16 casts truncate (an error up to
    one ulp where rounding makes half of one)."""
    return 2 * FACTOR if got.dtype == torch.bfloat16 and got.device.type == "cpu" and interpreting() else FACTOR


def tolerance_failures(got: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor,
                       factor: float | None = None) -> list[str]:
    """Why `got` fails the rule above, as messages (empty: it passes). The floor is got.dtype's."""
    factor = default_factor(got) if factor is None else factor
    if got.shape != exact.shape:
        return [f"shape {tuple(got.shape)} != {tuple(exact.shape)}"]
    if got.isnan().any():
        return [f"NaN in the output ({int(got.isnan().sum())} elements): an element was not written"]
    floor = FLOOR[got.dtype]
    width = got.shape[-1] if got.dim() else 1
    x = exact.detach().to(torch.float64).reshape(-1, width)
    d_got, d_eager = ((t.detach().to(torch.float64).reshape(-1, width) - x).abs() for t in (got, eager))
    x = x.abs()
    failures = []
    err, allowed = d_got.max().item(), factor * d_eager.max().item() + floor * x.max().item()
    if not err <= allowed:
        failures.append(f"max error {err:.3g} > allowed {allowed:.3g} (max |exact| {x.max().item():.3g})")

    def rms(t):
        return t.square().mean(-1).sqrt()
    row_err, eager_err, row_rms = rms(d_got), rms(d_eager), rms(x)
    row_allowed = factor * eager_err + floor * row_rms
    bad = ~(row_err <= row_allowed)
    if bad.any():
        i = int(torch.argmax(torch.where(bad, row_err / row_allowed.clamp_min(1e-300), 0.0)))
        failures.append(f"{int(bad.sum())} of {len(bad)} rows off, worst row {i}: rms error {row_err[i]:.3g} > "
                        f"allowed {row_allowed[i]:.3g} (eager's {eager_err[i]:.3g}, row rms {row_rms[i]:.3g})")
    return failures


def assert_matches(got: torch.Tensor, fn, *args, **kwargs) -> None:
    """`got` is within the rule above of the reference `fn(*args, **kwargs)` (a function or a module)."""
    exact, eager = reference_pair(fn, *args, **kwargs)
    assert_within(got, exact, eager)


def assert_within(got: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor) -> None:
    failures = tolerance_failures(got, exact, eager)
    assert not failures, "; ".join(failures)
