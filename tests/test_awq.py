"""AWQ 4-bit checkpoints (autoglm_fast/quant/awq.py) against an independent packer and dequantizer written
from the format's documentation (AutoAWQ's WQLinear_GEMM.from_linear and dequantize_gemm):

    qweight int32 [K, N/8]: column c's int32 holds, in nibble i (bits 4i .. 4i+3), the code of column 8c + ORDER[i]
    qzeros  int32 [K/G, N/8]: the same packing;  scales fp16 [K/G, N]
    w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n];  nn.Linear weight W = w^T

The helpers here share no code with the library: explicit loops over the eight nibble positions, row-major
[K, N] arithmetic, and int64 bit operations."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from autoglm_fast.families.glm4v.model import hf_name
from autoglm_fast.quant import QuantLinear
from autoglm_fast.quant.awq import awq_settings, load_awq_linears, split_awq, unpack_awq
from autoglm_fast.weights import CheckpointError, checkpoint_files, load_tensors

DOC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ gemm: nibble i <- column 8c + DOC_ORDER[i]
PLAIN_ORDER = list(range(8))


# ---- the independent side ------------------------------------------------------------------------------------
def awq_pack(codes: torch.Tensor, order=DOC_ORDER) -> torch.Tensor:
    """Codes [R, C] in [0, 15] -> int32 [R, C/8], one nibble position at a time."""
    rows, cols = codes.shape
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            packed[:, c] |= codes[:, 8 * c + order[i]].long() << (4 * i)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)  # the bits, as int32


def awq_dequantize(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Codes q [K, N], zeros z [K/G, N], scales s [K/G, N] -> the nn.Linear weight [N, K] in fp32."""
    K = q.shape[0]
    G = K // z.shape[0]
    w = torch.empty(q.shape, dtype=torch.float32)
    for g in range(z.shape[0]):
        w[g * G:(g + 1) * G] = (q[g * G:(g + 1) * G].float() - z[g].float()) * s[g].float()
    return w.t()


def awq_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's round-to-nearest (pseudo_quantize_tensor, zero point on) of an nn.Linear weight [N, K] in AWQ's
    [K, N] layout: (codes [K, N], zeros [K/G, N], fp16 scales [K/G, N])."""
    w = weight.detach().float().t()  # [K, N]
    K, N = w.shape
    groups = w.reshape(K // group_size, group_size, N)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    s = ((hi - lo).clamp(min=1e-5) / 15).half()
    z = (-torch.round(lo / s.float())).clamp(0, 15)
    q = (torch.round(groups / s.float()[:, None]) + z[:, None]).clamp(0, 15)
    return q.reshape(K, N).long(), z.long(), s


def random_awq(K: int, N: int, G: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(0, 16, (K // G, N), generator=gen)
    s = (torch.rand(K // G, N, generator=gen) * 0.02 + 1e-3).half()
    return q, z, s


def place(root: nn.ModuleDict, name: str, module: nn.Module) -> None:
    *path, leaf = name.split(".")
    for part in path:
        if part not in root:
            root[part] = nn.ModuleDict()
        root = root[part]
    root[leaf] = module


# ---- a two-shard checkpoint and a meta model to load it into ----------------------------------------------------
LINEARS = {  # checkpoint prefix -> (in_features K, out_features N, bias)
    "model.layers.0.mlp.down_proj": (128, 64, False),
    "model.layers.0.self_attn.q_proj": (128, 32, True),
}
NORM = "model.layers.0.input_layernorm.weight"


def write_checkpoint(directory: Path, G: int, order=DOC_ORDER, drop: str | None = None) -> dict[str, torch.Tensor]:
    """Each linear's three tensors in its own shard (with its bias), the norm in the first; returns the
    expected [N, K] fp32 weights and the fp16 biases / norm, by model name."""
    expected, shards = {}, [{}, {}]
    for (prefix, (K, N, bias)), shard in zip(LINEARS.items(), shards):
        q, z, s = random_awq(K, N, G, seed=K + N)
        shard.update({f"{prefix}.qweight": awq_pack(q, order), f"{prefix}.qzeros": awq_pack(z, order),
                      f"{prefix}.scales": s})
        expected[hf_name(prefix)] = awq_dequantize(q, z, s)
        if bias:
            shard[f"{prefix}.bias"] = expected[hf_name(prefix) + ".bias"] = torch.randn(N).half()
    shards[0][NORM] = expected[hf_name(NORM)] = torch.rand(128).half()
    if drop:
        del shards[0][drop]
    directory.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        save_file(shard, str(directory / f"part{i}.safetensors"))
    index = {name: f"part{i}.safetensors" for i, shard in enumerate(shards) for name in shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return expected


def meta_model(sizes: dict[str, tuple[int, int, bool]] = LINEARS) -> nn.ModuleDict:
    root = nn.ModuleDict()
    with torch.device("meta"):
        for prefix, (K, N, bias) in sizes.items():
            place(root, hf_name(prefix), nn.Linear(K, N, bias=bias))
        place(root, hf_name(NORM).removesuffix(".weight"), nn.LayerNorm(128, bias=False))
    return root


def load(model: nn.Module, directory: Path, G: int, dtype=None) -> None:
    """What a loader does: the other tensors through load_tensors, then the AWQ linears."""
    others, linears = split_awq(checkpoint_files(directory), hf_name)
    replaced = {f"{m}.weight" for m in linears}
    expected = {n for n in model.state_dict() if n not in replaced}
    load_tensors(model, others, hf_name, expected, dtype, "cpu", str(directory))
    load_awq_linears(model, linears, G, dtype, "cpu", str(directory))


# ---- tests ------------------------------------------------------------------------------------------------------
def test_packer_follows_the_documented_nibble_order():
    """Columns 0..7 holding codes 1..8 pack to nibbles (low to high) 1 3 5 7 2 4 6 8: 0x86427531; the library
    reads them back in column order."""
    q = torch.zeros(32, 8, dtype=torch.long)
    q[0] = torch.arange(1, 9)
    packed = awq_pack(q)
    assert packed[0, 0].item() == 0x86427531 - 2 ** 32
    qweight, scales, zeros = unpack_awq(packed, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8).half())
    w = QuantLinear.from_quantized(qweight, scales, zeros).dequantize(torch.float32)
    assert w[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("G", [32, 64, 128])
def test_load_matches_independent_dequantization(tmp_path, G):
    expected = write_checkpoint(tmp_path, G)
    model = meta_model()
    load(model, tmp_path, G)
    for prefix, (K, N, bias) in LINEARS.items():
        name = hf_name(prefix)
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and (layer.in_features, layer.out_features, layer.group_size) == (K, N, G)
        assert layer.qweight.is_contiguous() and layer.scales.dtype == torch.float16
        assert torch.equal(layer.dequantize(torch.float32), expected[name])
        assert torch.equal(layer.bias, expected[name + ".bias"]) if bias else layer.bias is None
    assert torch.equal(model.get_submodule(hf_name(NORM).removesuffix(".weight")).weight, expected[hf_name(NORM)])
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_load_casts_to_dtype(tmp_path):
    expected = write_checkpoint(tmp_path, 32)
    model = meta_model()
    load(model, tmp_path, 32, dtype=torch.float32)
    layer = model.get_submodule(hf_name("model.layers.0.self_attn.q_proj"))
    assert layer.scales.dtype == layer.bias.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), expected[hf_name("model.layers.0.self_attn.q_proj")])


def test_wrong_nibble_order_does_not_match(tmp_path):
    """Packed in plain order 0..7 the codes land in other columns: the comparison above would fail."""
    expected = write_checkpoint(tmp_path, 32, order=PLAIN_ORDER)
    model = meta_model()
    load(model, tmp_path, 32)
    for prefix in LINEARS:
        assert not torch.equal(model.get_submodule(hf_name(prefix)).dequantize(torch.float32), expected[hf_name(prefix)])


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": ["visual"]}


def test_awq_settings_accepts_the_published_config():
    assert awq_settings({"hidden_size": 8}) is None
    want = {"group_size": 128, "modules_to_not_convert": ["visual"]}
    assert awq_settings({"quantization_config": AWQ_CONFIG}) == want
    assert awq_settings({"text_config": {"quantization_config": AWQ_CONFIG}}) == want
    minimal = {"quant_method": "AWQ", "group_size": 64, "version": "GEMM", "modules_to_not_convert": None}
    assert awq_settings({"quantization_config": minimal}) == {"group_size": 64, "modules_to_not_convert": []}


@pytest.mark.parametrize("field,value", [
    ("quant_method", "gptq"), ("quant_method", "bitsandbytes"), ("quant_method", "fp8"), ("bits", 8),
    ("version", "gemv"), ("version", "marlin"), ("version", "exllama"), ("zero_point", False),
    ("group_size", 256), ("group_size", -1)])
def test_awq_settings_rejects_unsupported_variants(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        awq_settings({"quantization_config": {**AWQ_CONFIG, field: value}})


def test_shape_mismatch_names_the_module(tmp_path):
    write_checkpoint(tmp_path, 32)
    model = meta_model({**LINEARS, "model.layers.0.mlp.down_proj": (128, 72, False)})
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj .*out_features=72.*\(128, 8\)"):
        load(model, tmp_path, 32)
    model = meta_model()
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj .*group_size=64"):  # the config's G is not the file's
        load(model, tmp_path, 64)


def test_out_features_not_a_multiple_of_8(tmp_path):
    write_checkpoint(tmp_path, 32)
    model = meta_model({**LINEARS, "model.layers.0.mlp.down_proj": (128, 60, False)})
    with pytest.raises(CheckpointError, match=r"down_proj .*out_features=60"):
        load(model, tmp_path, 32)


def test_missing_qzeros(tmp_path):
    write_checkpoint(tmp_path, 32, drop="model.layers.0.mlp.down_proj.qzeros")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.qzeros"):
        split_awq(checkpoint_files(tmp_path), hf_name)


def test_a_module_that_is_not_a_linear(tmp_path):
    write_checkpoint(tmp_path, 32)
    model = meta_model()
    with torch.device("meta"):
        place(model, hf_name("model.layers.0.mlp.down_proj"), nn.Identity())
    with pytest.raises(CheckpointError, match=r"down_proj has AWQ tensors but is not an nn\.Linear"):
        load(model, tmp_path, 32)


def test_unpack_checks_dtypes_and_shapes():
    q, z, s = random_awq(64, 16, 32, seed=0)
    qweight, qzeros = awq_pack(q), awq_pack(z)
    for bad, name in [((qweight.long(), qzeros, s), "qweight"), ((qweight.float(), qzeros, s), "qweight"),
                      ((qweight, qzeros.to(torch.int16), s), "qzeros"), ((qweight, qzeros, s.int()), "scales"),
                      ((qweight, qzeros, s[:, :8]), "scales"), ((qweight, qzeros[:, :1], s), "qzeros"),
                      ((qweight[:48], qzeros, s), "group size")]:
        with pytest.raises(ValueError, match=name):
            unpack_awq(*bad)


def test_int64_checkpoint_tensor_is_a_checkpoint_error(tmp_path):
    write_checkpoint(tmp_path, 32)
    file = tmp_path / "part0.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.down_proj.qweight"] = tensors["model.layers.0.mlp.down_proj.qweight"].long()
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"down_proj: qweight must be a 2-D int32"):
        load(meta_model(), tmp_path, 32)


# ---- a full AWQ checkpoint directory from a floating-point one ---------------------------------------------------
QUANTIZED = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate_up_proj|down_proj))\.weight$")


def write_awq_checkpoint(model_dir_fp: Path, out_dir: Path, group_size: int = 32) -> dict[str, torch.Tensor]:
    """Turn a floating-point checkpoint directory (tests/glm4v_checkpoint.py's) into an AWQ one as AutoAWQ
    publishes it: every decoder linear of the language model (not lm_head, not the vision tower) becomes
    .qweight / .qzeros / .scales (round to nearest, independent packer), other tensors are copied and
    config.json gains quantization_config. Other files are copied as they are. Returns the dequantized
    weights the quantized tensors stand for, by checkpoint weight name (fp32 [N, K])."""
    model_dir_fp, out_dir = Path(model_dir_fp), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir_fp.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            (out_dir / path.name).write_bytes(path.read_bytes())
    expected, tensors = {}, {}
    for name, file in checkpoint_files(model_dir_fp).items():
        with safe_open(str(file), framework="pt") as f:
            t = f.get_tensor(name)
        if QUANTIZED.search(name) and "visual" not in name:
            prefix = name.removesuffix(".weight")
            q, z, s = awq_rtn(t, group_size)
            tensors.update({f"{prefix}.qweight": awq_pack(q), f"{prefix}.qzeros": awq_pack(z), f"{prefix}.scales": s})
            expected[name] = awq_dequantize(q, z, s)
        else:
            tensors[name] = t
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir_fp / "config.json").read_text())
    config["quantization_config"] = {**AWQ_CONFIG, "group_size": group_size,
                                     "modules_to_not_convert": ["visual", "lm_head"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return expected


def test_write_awq_checkpoint_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(3)
    fp = {"model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=gen),
          "model.language_model.layers.0.self_attn.q_proj.bias": torch.randn(64, generator=gen),
          "model.language_model.layers.0.mlp.gate_up_proj.weight": torch.randn(192, 64, generator=gen),
          "model.language_model.layers.0.mlp.down_proj.weight": torch.randn(64, 96, generator=gen),
          "model.visual.blocks.0.mlp.down_proj.weight": torch.randn(32, 64, generator=gen),
          "lm_head.weight": torch.randn(40, 64, generator=gen)}
    (tmp_path / "fp").mkdir()
    save_file(fp, str(tmp_path / "fp" / "model.safetensors"))
    (tmp_path / "fp" / "config.json").write_text(json.dumps({"model_type": "glm4v", "text_config": {}}))
    expected = write_awq_checkpoint(tmp_path / "fp", tmp_path / "awq", group_size=32)
    assert sorted(expected) == sorted(n for n in fp if "language_model" in n and n.endswith(".weight"))
    settings = awq_settings(json.loads((tmp_path / "awq" / "config.json").read_text()))
    assert settings["group_size"] == 32
    root = nn.ModuleDict()
    with torch.device("meta"):
        for name, t in fp.items():
            if name.endswith(".weight"):
                place(root, name.removesuffix(".weight"), nn.Linear(t.shape[1], t.shape[0],
                                                                     bias=name.replace("weight", "bias") in fp))
    load(root, tmp_path / "awq", settings["group_size"])
    for name, w in expected.items():
        layer = root.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(layer.dequantize(torch.float32), w)
        # round to nearest: half a step, and a little more at a group's ends (its fp16 scale is rounded)
        assert (w - fp[name]).abs().max() <= layer.scales.float().max()
    assert isinstance(root.get_submodule("lm_head"), nn.Linear)
    assert torch.equal(root.get_submodule("model.visual.blocks.0.mlp.down_proj").weight,
                       fp["model.visual.blocks.0.mlp.down_proj.weight"])
