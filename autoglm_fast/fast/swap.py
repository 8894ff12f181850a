"""`apply_fast_kernels(model)`: swap every supported reference layer for its fast twin, in place."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from ..kernels.utils import device_supported
from ..reference.adapter import DualPathAdapter
from ..reference.clip import CLIPAttention
from ..reference.fusion import GatedFusion
from ..reference.glm import GlmAttention, GlmDecoderLayer, GlmMLP, GlmModel, RMSNorm
from ..reference.whisper import WhisperAttention
from .adapter import FastDualPathAdapter
from .encoders import FastCLIPAttention, FastWhisperAttention
from .fusion import FastGatedFusion
from .glm import FastGlmAttention, FastGlmDecoderLayer, FastGlmMLP, FastGlmModel, FastRMSNorm
from .quant import FastQuantLinear
from ..quant.linear import QuantLinear
from ..quant.quantize import replace_module

# reference class -> fast class (exact types: a subclass may change the math). The shared layers are
# here; a family's own (e.g. GLM-4.1V's vision blocks) come from its `fast_modules` entry, read lazily.
FAST_MODULES: dict[type, type] = {
    DualPathAdapter: FastDualPathAdapter, GatedFusion: FastGatedFusion,
    GlmModel: FastGlmModel, GlmDecoderLayer: FastGlmDecoderLayer, GlmAttention: FastGlmAttention,
    GlmMLP: FastGlmMLP, QuantLinear: FastQuantLinear,
    RMSNorm: FastRMSNorm, CLIPAttention: FastCLIPAttention, WhisperAttention: FastWhisperAttention,
}


def fast_modules() -> dict[type, type]:
    """Every swap: the shared table plus each model family's."""
    from ..families import FAMILIES
    table = dict(FAST_MODULES)
    for family in FAMILIES:
        table.update(family.fast_table())
    return table


@dataclass
class FastKernelReport:
    swapped: dict[str, str] = field(default_factory=dict)   # module name -> "Ref -> Fast"
    skipped: dict[str, str] = field(default_factory=dict)   # module name -> why it kept the reference

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s):"] + [f"  {n}: {c}" for n, c in self.swapped.items()]
        if self.skipped:
            lines += [f"kept the reference for {len(self.skipped)}:"] + [f"  {n}: {r}" for n, r in self.skipped.items()]
        return "\n".join(lines)


def apply_fast_kernels(model: nn.Module) -> FastKernelReport:
    """Replace supported layers of `model` (in place) by fast modules sharing their parameters."""
    report, table = FastKernelReport(), fast_modules()
    for name, module in list(model.named_modules()):
        fast_cls = table.get(type(module))
        if fast_cls is None:
            continue
        param = next(module.parameters(), None)
        if param is not None and not device_supported(param.device):
            report.skipped[name] = (f"parameters on {param.device}: kernels need CUDA "
                                    "(or CPU with TRITON_INTERPRET=1)")
            continue
        fast = fast_cls.from_reference(module)
        if name:
            replace_module(model, name, fast)
        else:  # the model itself is a supported layer: swap its class in place
            module.__class__ = fast_cls
        report.swapped[name or type(module).__name__] = f"{type(module).__name__} -> {fast_cls.__name__}"
    if report.skipped:
        warnings.warn("apply_fast_kernels kept the eager reference for "
                      f"{len(report.skipped)} module(s): {next(iter(report.skipped.values()))}",
                      RuntimeWarning, stacklevel=2)
    return report
