"""Weight-only quantization: QuantLinear, round-to-nearest int8 / int4 at load, AWQ checkpoints."""
from .linear import QuantLinear, fuse_quant_linears

__all__ = ["QuantLinear", "fuse_quant_linears"]
