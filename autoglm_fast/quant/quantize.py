"""Which layers weight-only quantization replaces, and doing it layer by layer (round to nearest).

    decoder   every nn.Linear of the GLM decoder (qkv, o, gate_up, down): int8, or int4 in groups
    lm_head   int8 (also when the decoder is int4: the logits are the most sensitive projection)
    towers    the vision / audio encoders: kept in the activation dtype unless quantize_vision
Embeddings, norms, adapters and the fusion stay as they are. A model says which modules play which role
(`quantization_roles()`), so no family is special-cased here. Quantizing streams: each Linear is replaced
as soon as its weight exists (`StreamingQuantizer`, called by the loaders per tensor), so peak memory is
the quantized model plus one full-precision layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.quant import GROUP_SIZES
from .linear import QuantLinear

METHODS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantConfig:
    method: str               # "int8" | "int4"
    group_size: int = 128     # int4 groups along in_features
    quantize_vision: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of {sorted(METHODS)} or None, got {self.method!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    @property
    def bits(self) -> int:
        return METHODS[self.method]

    def bits_for(self, role: str) -> int | None:
        """The bits a Linear of this role gets, or None to keep it (the towers unless asked)."""
        if role == "lm_head":
            return 8
        if role == "towers" and not self.quantize_vision:
            return None
        return self.bits


def resolve(quantization: str | QuantConfig | None, quantize_vision: bool = False,
            group_size: int = 128) -> QuantConfig | None:
    """A QuantConfig from the user's options (None: no quantization)."""
    if quantization is None or isinstance(quantization, QuantConfig):
        if quantization is None and quantize_vision:
            raise ValueError("quantize_vision needs quantization='int8' or 'int4'")
        return quantization
    if not isinstance(quantization, str):
        raise TypeError(f"quantization must be a str ('int8', 'int4') or None, got {type(quantization).__name__}")
    return QuantConfig(quantization, group_size, quantize_vision)


def quant_targets(model: nn.Module, config: QuantConfig) -> dict[str, int]:
    """{module name: bits} of every nn.Linear the config quantizes, from the model's roles."""
    role_of = {}
    for role, roots in model.quantization_roles().items():
        for root in roots:
            if root is not None:
                role_of.update({id(m): role for m in root.modules()})
    targets = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and id(module) in role_of:
            bits = config.bits_for(role_of[id(module)])
            if bits is not None:
                targets[name] = bits
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class StreamingQuantizer:
    """Replaces each target Linear by its QuantLinear once the Linear's weight has data: the loaders call
    `ready(model, module_name)` after writing a tensor; the full-precision weight is dropped right there.
    A Linear whose weight is tied to another module's (an lm_head tied to the embeddings) is left alone."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        self.config = config
        tied = _tied_parameters(model)
        self.targets = {name: bits for name, bits in quant_targets(model, config).items()
                        if id(model.get_submodule(name).weight) not in tied}

    def ready(self, model: nn.Module, module_name: str) -> None:
        bits = self.targets.get(module_name)
        if bits is None:
            return
        linear = model.get_submodule(module_name)
        if type(linear) is not nn.Linear or linear.weight.is_meta or (linear.bias is not None and linear.bias.is_meta):
            return  # already replaced, or not all of it loaded yet
        replace_module(model, module_name, QuantLinear.from_linear(linear, bits, self.config.group_size))

    def finish(self, model: nn.Module) -> None:
        """Quantize what no loader reported (e.g. weights present before loading began)."""
        for name in self.targets:
            self.ready(model, name)


def quantize_model(model: nn.Module, config: QuantConfig | str) -> nn.Module:
    """Quantize a loaded model in place, one Linear at a time."""
    StreamingQuantizer(model, resolve(config)).finish(model)
    return model


def quantized_layout(model: nn.Module, config: QuantConfig | str) -> nn.Module:
    """Replace every target by an empty QuantLinear on the meta device: a quantized model's shapes and bytes
    without data (`autoglm-fast info`)."""
    config = resolve(config)
    return meta_layout(model, StreamingQuantizer(model, config).targets, config.group_size)


def meta_layout(model: nn.Module, targets: dict[str, int], group_size: int) -> nn.Module:
    """Replace the named Linears by empty QuantLinears of `targets[name]` bits on the meta device."""
    for name, bits in targets.items():
        linear = model.get_submodule(name)
        with torch.device("meta"):
            replace_module(model, name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                                    bits=bits, group_size=group_size, dtype=linear.weight.dtype))
    return model


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module."""
    seen, tied = set(), set()
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                (tied if id(p) in seen else seen).add(id(p))
    return tied
