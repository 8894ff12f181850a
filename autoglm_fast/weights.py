"""Weights I/O: our checkpoint format (config.json + safetensors shards + index), Hugging Face part
checkpoints mapped by name, and seeded random initialisation.

Loading never holds two copies of the weights: the model is built on the meta device, every
checkpoint header is checked against it first (one error lists every missing, unexpected and
mis-shaped tensor), then tensors are read one at a time from memory-mapped shards and assigned.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, or files that cannot be read."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '2GB' (powers of 1000, as transformers) or '2GiB' (of 1024)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '2GB' / '2GiB', got {size!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMG".index(m.group(2) or " "))


# ---- saving --------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, directory: str | Path, max_shard_size: int | str = "2GB",
                    tokenizer=None) -> None:
    """config.json + shards + index; with `tokenizer` (a `tokenizer.Tokenizer`) also its files, so that
    loading needs no tokenizer option. Without one, tokenizer files already in `directory` stay."""
    from .quant.linear import QuantLinear
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("this model is one tensor-parallel rank's shard; save the checkpoint it was loaded from "
                         "(or build the model with tensor_parallel_size=1 to save it)")
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("save_pretrained writes full-precision checkpoints; this model is quantized (quantize at "
                         "load instead: quantization='int8' / 'int4')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        tensor = tensor.detach().cpu()
        if tensor.untyped_storage().nbytes() != nbytes or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # a view (fast modules fuse q/k/v)
        shards[-1][name] = tensor
        size += nbytes
    for stale in directory.glob("model-*-of-*.safetensors"):  # shards of an earlier save
        stale.unlink()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    model.config.save(directory / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save(directory)


# ---- reading checkpoint files --------------------------------------------------------------------
def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to its file, for a directory (index or single file) or one .safetensors file."""
    path = Path(path)
    if path.is_file():
        return {key: path for key in _header(path)}
    if (path / INDEX_NAME).is_file():
        try:
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_NAME}: not a valid safetensors index ({e})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{path}: the index names shard files that do not exist: {absent}")
        headers = {f: _header(f) for f in set(files.values())}
        not_there = sorted(n for n, f in files.items() if n not in headers[f])
        if not_there:
            raise CheckpointError(f"{path}: tensors listed in the index are not in their shard: {not_there}")
        return files
    if (path / SINGLE_FILE).is_file():
        return checkpoint_files(path / SINGLE_FILE)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_NAME} found (only safetensors checkpoints load)")


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot open ({e})") from None


# ---- loading into a model --------------------------------------------------------------------------
def load_tensors(model: nn.Module, files: dict[str, Path], rename, expected: set[str],
                 dtype: torch.dtype | None, device: torch.device | str | None, source: str,
                 quantizer=None, shards: dict | None = None) -> None:
    """Check, then load, checkpoint tensors into `model`.

    rename(ckpt_name) -> model name, or None to skip a tensor the model has no use for.
    expected: the model names that must all be provided.
    quantizer: a quant.StreamingQuantizer, told after each tensor which module it completed (it replaces
    a target Linear by its quantized twin at once, so full-precision weights never pile up).
    shards: model name -> parallel.sharding.Shard for a tensor-parallel rank: only that part of the tensor
    is read from the file.
    """
    shards = shards or {}
    targets = model.state_dict(keep_vars=True)
    plan: dict[Path, list[tuple[str, str]]] = {}
    seen: dict[str, str] = {}
    duplicate = []
    for ckpt_name, file in files.items():
        name = rename(ckpt_name)
        if name is None:
            continue
        if name in seen:
            duplicate.append(f"{name}: from both {seen[name]} and {ckpt_name}")
        seen[name] = ckpt_name
        plan.setdefault(file, []).append((ckpt_name, name))
    headers = {f: _header(f) for f in plan}
    provided = {name for pairs in plan.values() for _, name in pairs}
    missing = sorted(expected - provided)
    unexpected = sorted(c for pairs in plan.values() for c, n in pairs if n not in expected)
    wrong = sorted(f"{n}: checkpoint {headers[f][c]} vs model {tuple(targets[n].shape)}"
                   for f, pairs in plan.items() for c, n in pairs
                   if n in expected and _local(headers[f][c], shards.get(n)) != tuple(targets[n].shape))
    problems = [f"{label} ({len(items)}):\n    " + "\n    ".join(items)
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                     ("given twice", sorted(duplicate)))
                if items]
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    for file, pairs in _progress(plan.items(), len(plan), source):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for ckpt_name, name in pairs:
                _assign(model, name, read_tensor(f, ckpt_name, shards.get(name)), dtype, device)
                if quantizer is not None:
                    quantizer.ready(model, name.rpartition(".")[0])


def read_tensor(f, name: str, shard=None) -> torch.Tensor:
    """A tensor of an open safetensors file, or only a tensor-parallel rank's Shard of it (a slice read)."""
    return f.get_tensor(name) if shard is None else shard.take(f.get_slice(name))


def _local(shape: tuple[int, ...], shard) -> tuple[int, ...]:
    return shape if shard is None else shard.local_shape(shape)


def meta_model(cls, config, tensor_parallel=None, quantization=None, awq: dict | None = None) -> tuple[nn.Module, dict]:
    """`cls(config)` on the meta device, and the Shard of each split tensor: one tensor-parallel rank's
    model (parallel/sharding.py) when tensor_parallel is given, else the whole model and no shards. 4-bit
    weights (int4 quantization, an AWQ checkpoint's settings) split the MLP in whole groups."""
    if tensor_parallel is not None:
        from .parallel.sharding import build_sharded
        return build_sharded(cls, config, tensor_parallel, group_align(quantization, awq))
    with torch.device("meta"):
        return cls(config), {}


def group_align(quantization=None, awq: dict | None = None) -> int:
    """The 4-bit group size a tensor-parallel MLP split keeps whole (1: none)."""
    if awq is not None:
        return awq["group_size"]
    return quantization.group_size if quantization is not None and quantization.bits == 4 else 1


def _progress(items, total: int, source: str):
    """A tqdm bar over the shards when tqdm is installed and there is more than one shard."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=f"loading {Path(source).name}", unit="shard", disable=total < 2)


def _assign(model: nn.Module, name: str, value: torch.Tensor, dtype, device) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf)
    if old is None:
        raise CheckpointError(f"{name} is not a parameter of the model")
    if old.is_meta:  # fresh model: take the tensor itself, cast once
        module._parameters[leaf] = nn.Parameter(value.to(device=device or "cpu", dtype=dtype or value.dtype),
                                                requires_grad=old.requires_grad)
    else:
        with torch.no_grad():
            old.copy_(value)


def load_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu", quantization=None, tensor_parallel=None):
    from .config import AutoGLMPhoneConfig
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; save with model.save_pretrained(dir)")
    model, shards = meta_model(cls, AutoGLMPhoneConfig.load(directory / CONFIG_NAME), tensor_parallel, quantization)
    load_checkpoint(model, directory, lambda n: n, set(model.state_dict()), dtype, device, quantization,
                    shards=shards)
    return model.eval()


def load_checkpoint(model: nn.Module, directory: str | Path, rename, expected: set[str], dtype, device,
                    quantization=None, awq: dict | None = None, shards: dict | None = None) -> None:
    """A checkpoint directory into `model` (built on the meta device), as published or quantized at load.
    quantization: a quant.QuantConfig (round to nearest, layer by layer). awq: `quant.awq.awq_settings` of an
    AWQ checkpoint's config: its packed layers load as QuantLinears, everything else as usual. shards: a
    tensor-parallel rank's (`meta_model`): each split tensor is read in part."""
    files, source = checkpoint_files(directory), str(directory)
    if awq is not None:
        if quantization is not None:
            raise ValueError(f"{directory} is already quantized (AWQ, 4-bit): load it without quantization=")
        from .quant.awq import load_awq_linears, split_awq
        files, linears = split_awq(files, rename)
        load_tensors(model, files, rename, expected - {f"{name}.weight" for name in linears}, dtype, device, source,
                     shards=shards)
        load_awq_linears(model, linears, awq["group_size"], dtype, device, source, shards)
    else:
        load_tensors(model, files, rename, expected, dtype, device, source, streaming_quantizer(model, quantization),
                     shards)
    _check_materialized(model)


def streaming_quantizer(model: nn.Module, quantization):
    """The StreamingQuantizer for a QuantConfig (quant/quantize.py), or None."""
    if quantization is None:
        return None
    from .quant.quantize import StreamingQuantizer
    return StreamingQuantizer(model, quantization)


# ---- Hugging Face checkpoints of the parts ----------------------------------------------------------
def _rename_glm(key: str) -> str | None:
    return None if "rotary_emb" in key else key


def _rename_clip(key: str) -> str | None:
    if key.startswith("vision_model.") and not key.endswith("position_ids"):
        return "vision_tower." + key
    if key.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale")) \
            or key.endswith("position_ids"):
        return None  # the rest of a full CLIPModel checkpoint
    return "vision_tower.vision_model." + key  # transformers 5 keeps CLIPVisionModel keys unprefixed


def _rename_whisper(key: str) -> str | None:
    for prefix in ("model.encoder.", "encoder."):
        if key.startswith(prefix):
            return "audio_tower." + key[len(prefix):]
    if key.startswith(("model.decoder.", "decoder.", "proj_out.")):
        return None  # the decoder of a full Whisper checkpoint
    return "audio_tower." + key  # a bare WhisperEncoder checkpoint


HF_PARTS = {  # part -> (model modules it fills, checkpoint-name mapping)
    "glm": (("model.", "lm_head."), _rename_glm),
    "clip": (("vision_tower.",), _rename_clip),
    "whisper": (("audio_tower.",), _rename_whisper),
}


def detect_hf_part(keys) -> str:
    keys = list(keys)
    if any(k.endswith("conv1.weight") and "vision" not in k for k in keys):
        return "whisper"
    if any(k.startswith(("vision_model.", "pre_layrnorm.")) for k in keys):
        return "clip"
    if any(k.startswith(("model.embed_tokens.", "model.layers.")) for k in keys):
        return "glm"
    raise CheckpointError("cannot tell which part this checkpoint is (GLM, CLIP or Whisper); pass part=")


def load_hf_weights(model: nn.Module, path: str | Path, part: str | None = None, *,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> str:
    """Load a HF GlmForCausalLM / CLIPVisionModel (or CLIPModel) / WhisperEncoder (or WhisperModel)
    safetensors checkpoint into the matching part of `model`. Returns the part name."""
    files = checkpoint_files(path)
    part = part or detect_hf_part(files)
    if part not in HF_PARTS:
        raise ValueError(f"part must be one of {sorted(HF_PARTS)}, got {part!r}")
    prefixes, rename = HF_PARTS[part]
    expected = {n for n in model.state_dict() if n.startswith(prefixes)}
    load_tensors(model, files, rename, expected, dtype, device, f"{path} (as {part})")
    return part


# ---- random initialisation -------------------------------------------------------------------------
def random_model(cls, config, seed: int, dtype: torch.dtype, device: torch.device | str,
                 quantization=None, tensor_parallel=None) -> nn.Module:
    """`cls(config)` built on the meta device, then every parameter allocated once in `dtype` on `device`
    and seeded-random initialised (no fp32 detour): any family's `from_config`. quantization: a QuantConfig;
    each target Linear is quantized as soon as it is initialised. tensor_parallel: build one rank's part
    (the same weights as the whole model's)."""
    model, shards = meta_model(cls, config, tensor_parallel, quantization)
    return materialize(model, dtype=dtype, device=device, seed=seed,
                       quantizer=streaming_quantizer(model, quantization), shards=shards).eval()


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device | str, seed: int = 0,
                std: float = 0.02, quantizer=None, shards: dict | None = None) -> nn.Module:
    """Give every parameter still on the meta device storage on `device`, seeded-random initialised
    like HF (normal(0, std) weights, zero biases, unit norm scales). Loaded parameters are untouched.
    quantizer: told each module that is done (see load_tensors). shards: a tensor-parallel rank's; a split
    tensor is drawn whole and its part kept, so the rank's weights are exactly those of the whole model."""
    shards = shards or {}
    from .reference.glm import RMSNorm
    from .reference.whisper import WhisperEncoder, sinusoids
    gen = torch.Generator(device=device).manual_seed(seed)
    sinusoidal = {id(m.embed_positions) for m in model.modules() if isinstance(m, WhisperEncoder)}
    for name, module in list(model.named_modules()):
        for leaf, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            shard = shards.get(f"{name}.{leaf}" if name else leaf)
            t = torch.empty(p.shape if shard is None else shard.full_shape(p.shape), dtype=dtype, device=device)
            if leaf.endswith("bias"):
                t.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                t.fill_(1.0)
            elif id(module) in sinusoidal:  # Whisper's fixed sinusoidal positions
                t.copy_(sinusoids(*t.shape))
            else:
                t.normal_(0.0, std, generator=gen)
            if shard is not None:
                t = shard.take(t)
            module._parameters[leaf] = nn.Parameter(t, requires_grad=p.requires_grad)
        if quantizer is not None:
            quantizer.ready(model, name)
    _check_materialized(model)
    return model


def _check_materialized(model: nn.Module) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left without data: {left}")
