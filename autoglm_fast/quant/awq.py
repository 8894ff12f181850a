"""AWQ 4-bit checkpoints as published (AutoAWQ's "gemm" layout, described by transformers'
`quantization_config` {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": true, "version": "gemm"}).

Per nn.Linear with weight W [N = out_features, K = in_features], the checkpoint holds
    qweight int32 [K, N / 8]      codes q[k, n] in [0, 15], eight per int32 along n
    qzeros  int32 [K / G, N / 8]  zero points z, packed the same way
    scales  fp16  [K / G, N]
and W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]. Within int32 column c, nibble i (bits 4i .. 4i + 3) holds
column 8c + AWQ_ORDER[i] (AutoAWQ's WQLinear_GEMM.from_linear packs with this order for its CUDA kernel).

Loading repacks each module into the int4 format of kernels/quant.py (uint8 [N, K / 2] along K, group-major
scales and zeros): the same tensors, so it is lossless, and the model runs on our kernels.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..kernels.quant import GROUP_SIZES, pack_int4
from ..weights import CheckpointError, read_tensor
from .linear import QuantLinear
from .quantize import replace_module

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # nibble that holds column 8c + j
PARTS = ("qweight", "qzeros", "scales")


def awq_settings(config: dict) -> dict | None:
    """The AWQ settings of a parsed config.json ({"group_size", "modules_to_not_convert"}), None when it has no
    quantization_config; ValueError naming the field for any quantization these loaders cannot run.
    Absent fields take transformers' AwqConfig defaults (bits 4, group_size 128, zero_point true, gemm)."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method != "awq":
        raise ValueError(f"quantization_config.quant_method={qc.get('quant_method')!r} is not supported "
                         f"(only AWQ 4-bit checkpoints load)")
    bits, group = qc.get("bits", 4), qc.get("group_size", 128)
    version, zero_point = str(qc.get("version", "gemm")).lower(), qc.get("zero_point", True)
    if bits != 4:
        raise ValueError(f"quantization_config.bits={bits!r} is not supported (AWQ loads 4-bit only)")
    if version != "gemm":
        raise ValueError(f"quantization_config.version={qc.get('version')!r} is not supported (AWQ loads the "
                         f"'gemm' packing only)")
    if zero_point is not True:
        raise ValueError(f"quantization_config.zero_point={zero_point!r} is not supported (AWQ loads "
                         f"asymmetric weights only)")
    if group not in GROUP_SIZES:
        raise ValueError(f"quantization_config.group_size={group!r} is not supported (one of {GROUP_SIZES})")
    return {"group_size": group, "modules_to_not_convert": list(qc.get("modules_to_not_convert") or [])}


def checkpoint_awq_settings(directory: str | Path) -> dict | None:
    """awq_settings of a checkpoint directory's config.json (None without one, or without quantization_config)."""
    path = Path(directory) / "config.json"
    return awq_settings(json.loads(path.read_text())) if path.is_file() else None


def _unpack_columns(packed: Tensor) -> Tensor:
    """int32 [R, C] in AWQ's nibble order -> codes uint8 [R, 8C] in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = ((packed[..., None] >> shifts) & 15).to(torch.uint8)  # [R, C, 8]; & 15 drops the sign extension
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """AWQ gemm tensors -> (qweight uint8 [N, K/2], scales [K/G, N], zeros uint8 [K/G, N]) in kernels/quant.py's
    int4 format, on qweight's device (scales as given)."""
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != torch.int32:
            raise ValueError(f"{name} must be a 2-D int32 tensor (eight 4-bit codes per element), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if not isinstance(scales, Tensor) or scales.dim() != 2 or not scales.is_floating_point():
        raise ValueError(f"scales must be a 2-D floating-point tensor, got "
                         f"{getattr(scales, 'dtype', type(scales).__name__)} {tuple(getattr(scales, 'shape', ()))}")
    K, N = qweight.shape[0], 8 * qweight.shape[1]
    groups = qzeros.shape[0]
    if qzeros.shape[1] != qweight.shape[1] or groups == 0 or K % groups:
        raise ValueError(f"qzeros must have shape (K / group_size, {N // 8}) with K={K}, got {tuple(qzeros.shape)}")
    if tuple(scales.shape) != (groups, N):
        raise ValueError(f"scales must have shape {(groups, N)} (qzeros' groups, 8 x qweight's columns), "
                         f"got {tuple(scales.shape)}")
    if K // groups not in GROUP_SIZES:
        raise ValueError(f"group size K / groups = {K}/{groups} must be one of {GROUP_SIZES}")
    codes = _unpack_columns(qweight).t().contiguous()  # [N, K]: our rows are output channels
    zeros = _unpack_columns(qzeros.to(qweight.device))
    return pack_int4(codes).contiguous(), scales.to(qweight.device).contiguous(), zeros


def split_awq(files: dict[str, Path], rename) -> tuple[dict[str, Path], dict[str, dict[str, tuple[str, Path]]]]:
    """Separate AWQ-quantized modules from the other tensors of a checkpoint.

    files: checkpoint tensor name -> file; rename(ckpt_name) -> model name or None (skip). Returns
    (the other tensors' files, {model module name: {"qweight" | "qzeros" | "scales": (ckpt name, file)}}).
    A module with qweight or qzeros must have all three (CheckpointError naming what is missing)."""
    prefixes: dict[str, dict[str, str]] = {}
    for name in files:
        prefix, _, leaf = name.rpartition(".")
        if leaf in PARTS:
            prefixes.setdefault(prefix, {})[leaf] = name
    linears: dict[str, dict[str, tuple[str, Path]]] = {}
    taken: set[str] = set()
    problems = []
    for prefix, parts in prefixes.items():
        if "qweight" not in parts and "qzeros" not in parts:
            continue  # a lone `.scales` belongs to something else; the normal loader judges it
        missing = [f"{prefix}.{p}" for p in PARTS if p not in parts]
        if missing:
            problems.append(f"{prefix}: no {', '.join(missing)}")
            continue
        target = rename(parts["qweight"])
        if target is None:
            continue  # the model has no use for it: left with the others, which the loader skips by name
        module = target.removesuffix(".qweight")
        if module in linears:
            problems.append(f"{module}: given twice (from {linears[module]['qweight'][0]} and {parts['qweight']})")
        linears[module] = {p: (parts[p], files[parts[p]]) for p in PARTS}
        taken.update(parts.values())
    if problems:
        raise CheckpointError("AWQ checkpoint modules are incomplete:\n  " + "\n  ".join(sorted(problems)))
    return {n: f for n, f in files.items() if n not in taken}, linears


def _read(entry: tuple[str, Path], shard=None) -> Tensor:
    name, file = entry
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return read_tensor(f, name, shard)


def _part_shards(weight_shard, group_size: int, where: str) -> dict:
    """A tensor-parallel rank's slices of qweight / qzeros / scales for its slice of the weight [N, K]:
    output rows are packed 8 to an int32 column, input columns are grouped G to a scales / qzeros row."""
    if weight_shard is None:
        return dict.fromkeys(PARTS)
    from ..parallel.sharding import Shard
    d, ranges, full = weight_shard.dim, weight_shard.ranges, weight_shard.full
    unit = 8 if d == 0 else group_size
    if any(s % unit or e % unit for s, e in ranges):
        raise CheckpointError(f"{where}: this rank's {'rows' if d == 0 else 'columns'} {ranges} do not fall on "
                              f"whole {'int32 words (8 rows)' if d == 0 else f'groups of {group_size}'}")
    packed = Shard(1 - d, tuple((s // unit, e // unit) for s, e in ranges), full // unit)
    whole = Shard(1 - d, ranges, full)  # AWQ tensors are [K, ...]: the weight's dims swapped
    return {"qweight": packed if d == 0 else whole, "qzeros": packed, "scales": whole if d == 0 else packed}


def load_awq_linears(model: nn.Module, linears: dict[str, dict[str, tuple[str, Path]]], group_size: int,
                     dtype: torch.dtype | None, device: torch.device | str | None, source: str,
                     shards: dict | None = None) -> None:
    """Replace each named nn.Linear of `model` by a QuantLinear holding its AWQ weight (split_awq's second
    result), one module at a time so that at most one module's checkpoint tensors are held; the Linear's
    bias (loaded already, or still on meta) is kept. shards: a tensor-parallel rank's (weight name -> Shard):
    only its slices of the packed tensors are read."""
    for module_name, entries in linears.items():
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{source}: {module_name} has AWQ tensors but is not an nn.Linear of the model "
                                  f"(found {type(linear).__name__})")
        where = f"{source}: {module_name}"
        parts = _part_shards((shards or {}).get(f"{module_name}.weight"), group_size, where)
        layer = _awq_linear(linear, entries, group_size, dtype, torch.device(device or "cpu"), where, parts)
        replace_module(model, module_name, layer)


def _awq_linear(linear: nn.Linear, entries: dict[str, tuple[str, Path]], group_size: int,
                dtype: torch.dtype | None, device: torch.device, where: str, shards: dict) -> QuantLinear:
    qweight, qzeros, scales = (_read(entries[p], shards[p]) for p in PARTS)
    K, N, G = linear.in_features, linear.out_features, group_size
    want = {"qweight": (K, N // 8), "qzeros": (K // G, N // 8), "scales": (K // G, N)}
    got = {p: tuple(t.shape) for p, t in zip(PARTS, (qweight, qzeros, scales))}
    if N % 8 or K % G or got != want:
        raise CheckpointError(f"{where} (in_features={K}, out_features={N}, group_size={G}) expects AWQ "
                              f"shapes {want}, the checkpoint has {got}")
    try:
        q, s, z = unpack_awq(qweight.to(device), qzeros.to(device), scales.to(device))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    bias = linear.bias
    if bias is not None and not bias.is_meta:
        bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype or bias.dtype),
                            requires_grad=bias.requires_grad)
    return QuantLinear.from_quantized(q, s.to(dtype or s.dtype), z, bias=bias)
