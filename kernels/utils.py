"""Shared pieces of every launcher: where kernels can run, interpreter-aware autotuning, input checks."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

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


# ---- configs from an offline-tuned table (kernels/tuned/*.json) instead of a benchmark at launch --------------
TARGETS = ("sm_80", "sm_89", "sm_90")  # the compile matrix's targets; tuned tables are kept per target
TUNED_DIR = Path(__file__).resolve().parent / "tuned"


def config_name(config: triton.Config) -> str:
    """'128x64 w8 s2': the meta-parameters' values, warps, stages — how tuned tables and reports name a config."""
    return "x".join(map(str, config.kwargs.values())) + f" w{config.num_warps} s{config.num_stages}"


def gpu_target(capability: tuple[int, int]) -> str:
    """The target whose configs and tuned table a GPU of this compute capability uses: sm_90 for Hopper, sm_80
    for A100 and Orin (164 KB of shared memory), sm_89 for the rest: its ~100 KB is the smallest of the three,
    so what fits there fits (nearly) everywhere."""
    major, minor = capability
    return "sm_90" if major == 9 else "sm_80" if (major, minor) in ((8, 0), (8, 7)) else "sm_89"


@functools.cache
def device_target(index: int) -> str:
    return gpu_target(torch.cuda.get_device_capability(index))


@functools.cache
def tuned_table(name: str) -> dict:
    """kernels/tuned/<name>.json, read once per process ({} when there is none)."""
    path = TUNED_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


class TableTuned:
    """A @triton.jit kernel (`fn`) whose launcher picks its config from a table tuned offline, so serving never
    stalls on a benchmark. `all_configs`: every config it ships; `configs`: those a launch may use — all of them
    on a GPU, the first under the interpreter, or the one `forced_config` forces (it narrows this list exactly
    as it does an autotuner's), so tests can run each config."""

    def __init__(self, fn, configs: list[triton.Config]):
        self.fn, self.all_configs = fn, list(configs)
        self.configs = self.all_configs[:1] if interpreting() else list(self.all_configs)
        self.cache: dict = {}

    def config_for(self, choose) -> triton.Config:
        """The config to launch: the only one when `configs` is narrowed to one, else `choose()` (the table's)."""
        return self.configs[0] if len(self.configs) == 1 else choose()


# ---- split-K launches whose last program reduces (paged_decode.py, quant_gemv.py) ----------------------------
_COUNTERS: dict[tuple, list[torch.Tensor]] = {}


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The GPU's SM count (an H100's 132 under the interpreter, so grids are planned as on a GPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def split_counters(device, pairs: int = 1, per_stream: bool = False) -> torch.Tensor:
    """The device's persistent int32 merge counters, one per output tile, all 0 between launches: the program
    that brings a tile's counter to its split count reduces the tile and resets it. Grown (never shrunk) when
    more are needed; older buffers stay alive for graphs captured on them. Zero-filled once, at allocation.
    per_stream: one buffer per CUDA stream, for kernels that may run on two streams at once (the engine's
    encoder stream beside the main one); launches sharing a buffer must be ordered on one stream."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device).cuda_stream if per_stream and device.type == "cuda" else None
    bufs = _COUNTERS.setdefault((device, per_stream, stream), [])
    if not bufs or bufs[-1].numel() < pairs:
        bufs.append(torch.zeros(max(pairs, 4096, 2 * bufs[-1].numel() if bufs else 0), dtype=torch.int32,
                                device=device))
    return bufs[-1]
