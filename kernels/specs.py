"""What a kernel module tells the compile matrix: each launch it can make, as plain data.

A kernel module's `compile_specs()` returns `CompileSpec`s holding the argument values a launch at
the real model shapes passes (ints, floats, `TensorArg` for tensors, constexprs and the config's
meta-parameters alike). The matrix (compile_matrix.py) derives from those values what Triton's
launcher derives: argument types and the specializations (ints divisible by 16, ints equal to 1,
16-byte aligned pointers). Kernel modules import this file only, never the matrix.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as the launcher sees it: element type and address. The caching allocator
    hands out blocks aligned far beyond 16 bytes, and every launcher passes whole tensors."""
    dtype: str                  # Triton's name of the element type: "fp16", "bf16", "fp32", "i32", "i64", "u8"
    address: int = 1 << 21

    def data_ptr(self) -> int:
        return self.address


@dataclass
class CompileSpec:
    kernel: str                 # name shown in reports
    fn: object                  # the @triton.jit function, or an autotuner wrapping one
    args: dict[str, object]     # every argument by name, with the value a real launch passes
    num_warps: int | None = None    # None: not passed by the launcher, Triton's default (4 warps, 3 stages)
    num_stages: int | None = None
    hot: bool = True            # hot kernels must not spill registers
    label: str = ""
    targets: tuple[str, ...] | None = None  # the targets (sm_80, ...) whose launcher can pick it; None: all

    @property
    def options(self) -> dict[str, int]:
        """The launch options the launcher passes."""
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages)) if v is not None}

    @classmethod
    def from_config(cls, kernel: str, fn, args: dict[str, object], config, **kw) -> "CompileSpec":
        """A spec at one triton.Config: its meta-parameters join the arguments."""
        return cls(kernel, fn, {**args, **config.kwargs}, config.num_warps, config.num_stages, **kw)
