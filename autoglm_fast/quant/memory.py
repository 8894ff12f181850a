"""Sizes of a model's parts, quantized or not: logical parameter counts and the bytes its weights take.
Both work on the meta device (a 9B model's sizes without allocating it)."""
from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear


def parameter_count(module: nn.Module) -> int:
    """Parameters, a QuantLinear's packed weight counted as the in x out weights it stands for."""
    return (sum(p.numel() for p in module.parameters())
            + sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, QuantLinear)))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and saved buffers (packed weights, scales, zero points); shared tensors once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + [b for m in module.modules() for name, b in m._buffers.items()
                                         if b is not None and name not in m._non_persistent_buffers_set]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def part_sizes(parts: dict[str, list[nn.Module | None]], measure) -> dict[str, int]:
    """{part: measure summed over its modules} plus "total" (a module counted in one part only)."""
    sizes = {part: sum(measure(m) for m in modules if m is not None) for part, modules in parts.items()}
    sizes["total"] = sum(sizes.values())
    return sizes


CARDS_GIB = (8, 12, 16, 24, 48, 80)
GIB = 2**30


def memory_report(model: nn.Module, dtype: torch.dtype, checkpoint=None, quantization=None,
                  quantize_vision: bool = False) -> dict:
    """What `autoglm-fast info` prints of memory, for a model built on the meta device in `dtype`: its weight
    bytes per part as they would be stored (quantized by the options, or an AWQ checkpoint's packed layers),
    the KV cache's bytes per token, and how many tokens of it fit on common cards - an estimate: 90 % of
    the card (vLLM's default gpu_memory_utilization) less the weights and 1 GiB of activations and context."""
    from .awq import checkpoint_awq_settings, split_awq
    from .quantize import meta_layout, quantized_layout, resolve
    config = resolve(quantization, quantize_vision)
    awq = checkpoint_awq_settings(checkpoint) if checkpoint else None
    if awq is not None and config is not None:
        raise ValueError(f"{checkpoint} is already quantized (AWQ, 4-bit): drop --quantization")
    if config is not None:
        quantized_layout(model, config)
    elif awq is not None:
        from ..families import family_for_checkpoint
        from ..weights import checkpoint_files
        rename = family_for_checkpoint(checkpoint).model_cls.checkpoint_name
        linears = split_awq(checkpoint_files(checkpoint), rename)[1]
        meta_layout(model, dict.fromkeys(linears, 4), awq["group_size"])
    parts = model.weight_bytes()
    text = model.config.text
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * dtype.itemsize
    free = {f"{c} GiB": int((0.9 * c * GIB - parts["total"] - GIB) // kv) for c in CARDS_GIB}
    return {"quantization": "awq int4" if awq else config.method if config else None,
            "weight_bytes": parts, "weight_gb": {k: round(v / 1e9, 3) for k, v in parts.items()},
            "weight_gib": {k: round(v / GIB, 3) for k, v in parts.items()}, "kv_bytes_per_token": kv,
            "kv_tokens_per_card": {k: max(0, v) for k, v in free.items()},
            "kv_tokens_assume": "90 % of the card, less the weights and 1 GiB for activations and the CUDA context"}

