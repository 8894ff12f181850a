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
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=lin.weight.requires_grad)
        start += n
    return weight, fuse_bias(linears, weight.dtype, weight.device)


def fuse_bias(layers, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The layers' biases as one tensor (zeros where a layer has none; None if none has one); each layer's
    bias becomes a view into it."""
    if all(layer.bias is None for layer in layers):
        return None
    bias = torch.cat([torch.zeros(layer.out_features, dtype=dtype, device=device) if layer.bias is None
                      else layer.bias.detach() for layer in layers])
    start = 0
    for layer in layers:
        n = layer.out_features
        if layer.bias is not None:
            layer.bias = nn.Parameter(bias[start:start + n], requires_grad=layer.bias.requires_grad)
        start += n
    return bias
