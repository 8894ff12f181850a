"""Drop-in fast modules: same parameters and state dict as the reference layers, Triton kernels inside."""
from .adapter import FastDualPathAdapter
from .fusion import FastGatedFusion
from .glm import FastGlmAttention, FastGlmDecoderLayer, FastGlmMLP, FastGlmModel, FastRMSNorm
from .swap import FastKernelReport, apply_fast_kernels

__all__ = ["FastDualPathAdapter", "FastGatedFusion", "FastGlmAttention", "FastGlmDecoderLayer", "FastGlmMLP",
           "FastGlmModel", "FastRMSNorm", "FastKernelReport", "apply_fast_kernels"]
