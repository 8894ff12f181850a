"""What every fast module shares: built from a reference layer without copying weights, and a
guarded fallback to the reference forward where the kernels cannot run."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ..kernels.utils import FLOAT_DTYPES, device_supported


class FastModule(nn.Module):
    _warned: set[str] = set()
    has_dropout = False  # True where training mode changes the math (the kernels implement eval mode)

    @classmethod
    def from_reference(cls, ref: nn.Module) -> "FastModule":
        """The same parameters (shared, not copied) under the fast class."""
        reference = cls.__mro__[cls.__mro__.index(FastModule) + 1]  # FastX(FastModule, X): X
        if not isinstance(ref, reference):
            raise TypeError(f"{cls.__name__}.from_reference needs a {reference.__name__}, "
                            f"got {type(ref).__name__}")
        fast = copy.copy(ref)  # shallow: parameters and submodules are the very same objects
        fast.__class__ = cls
        return fast

    def kernels_usable(self, x: torch.Tensor) -> bool:
        """False (with one warning per reason) where the reference forward must run instead."""
        if self.training and self.has_dropout:
            return self._fallback("training mode applies dropout; the kernels implement eval mode")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self._fallback("gradients are needed (grad mode); the kernels are inference-only")
        if x.dtype not in FLOAT_DTYPES:
            return self._fallback(f"dtype {x.dtype} is not supported")
        if not device_supported(x.device):
            return self._fallback(f"device {x.device} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)")
        return True

    def _fallback(self, reason: str) -> bool:
        key = f"{type(self).__name__}: {reason}"
        if key not in FastModule._warned:
            FastModule._warned.add(key)
            warnings.warn(f"{key}; running the eager reference instead", RuntimeWarning, stacklevel=3)
        return False


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [sum(out), in] weight, and bias (zeros where a projection has none), for Linears that read
    the same input: one GEMM instead of several. Each Linear keeps its parameter names as views into
    the fused tensors, so the state dict is unchanged and no weight is held twice. (Swap after moving
    the model to its device and dtype: a later .to() copies views apart.)"""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.weight.new_zeros(lin.weight.shape[0]) if lin.bias is None else lin.bias.detach()
                          for lin in linears])
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=lin.weight.requires_grad)
        if lin.bias is not None:
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=lin.bias.requires_grad)
        start += n
    return weight, bias
