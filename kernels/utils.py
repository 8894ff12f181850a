"""Shared pieces of every launcher: where kernels can run, interpreter-aware autotuning, input checks."""
from __future__ import annotations

import contextlib
import os

import torch
import triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """`triton.autotune` that keeps one config in the interpreter (several configs fail there).

    The full list stays on the autotuner as `all_configs`, so tests can run each one (`forced_config`).
    """
    def wrap(fn):
        tuner = triton.autotune(configs[:1] if interpreting() else configs, key=key, **kwargs)(fn)
        tuner.all_configs = list(configs)
        return tuner
    return wrap


@contextlib.contextmanager
def forced_config(tuner: triton.runtime.Autotuner, config: triton.Config):
    """Launch `tuner`'s kernel with exactly `config` inside the block: a one-config autotuner runs it
    without benchmarking, so every shipped config can be tested, not only the one that wins."""
    if config not in tuner.all_configs:
        raise ValueError(f"config {config} is not one of the kernel's configs")
    saved = tuner.configs, tuner.cache
    tuner.configs, tuner.cache = [config], {}
    try:
        yield
    finally:
        tuner.configs, tuner.cache = saved


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the eager references compute in: fp32 for 16-bit inputs, fp64 for fp64 ones (the exact answer
    the tests judge every result by)."""
    return torch.promote_types(dtype, torch.float32)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES,
                 like: torch.Tensor | None = None, contiguous_last: bool = True) -> None:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor the kernels can take as is."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if like is not None and dtypes is FLOAT_DTYPES and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the input is {like.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not device_supported(t.device):
        raise ValueError(f"{name} is on {t.device}: kernels need a CUDA device "
                         "(or CPU tensors with TRITON_INTERPRET=1)")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")
    if contiguous_last and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def as_rows(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> a [rows, width] view with a row stride; never a silent copy."""
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows "
                         f"of {width}; pass a tensor whose leading dimensions are contiguous") from None
