"""Weights I/O: our checkpoint format round trip, clear errors for broken checkpoints, and loading
without a second copy in memory. (Hugging Face part checkpoints: test_hf_checkpoints.py.)"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.demo import demo_image
from autoglm_fast.engine import Engine, SchedulerConfig
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from autoglm_fast.tokenizer import ByteTokenizer, HFTokenizer, TokenizerNotFoundError
from autoglm_fast.weights import CONFIG_NAME, INDEX_NAME, CheckpointError, checkpoint_files, parse_size
from helpers import glm_test_tokenizer, media_logits

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


# ---- helpers --------------------------------------------------------------------------------------
def nano() -> AutoGLMPhoneConfig:
    return AutoGLMPhoneConfig.preset("nano")


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def index_of(directory: Path) -> dict:
    return json.loads((directory / INDEX_NAME).read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A seeded nano model saved in many small shards."""
    model = AutoGLMPhoneForCausalLM.from_config(nano(), seed=3)
    directory = tmp_path_factory.mktemp("nano_sharded")
    model.save_pretrained(directory, max_shard_size="64KB")
    return model, directory


@pytest.fixture
def broken(saved, tmp_path):
    """A private copy of the saved checkpoint to corrupt."""
    _, directory = saved
    return Path(shutil.copytree(directory, tmp_path / "ckpt"))


# ---- 1. round trip ----------------------------------------------------------------------------------
def test_sharded_round_trip_is_bit_exact(saved):
    model, directory = saved
    index = index_of(directory)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]

    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name, fname in index["weight_map"].items():  # every tensor is in the shard the index names
        with safe_open(str(directory / fname), framework="pt") as f:
            assert name in f.keys()
    assert sum(len(load_file(str(s))) for s in shards) == len(state)  # and in no other shard
    for s in shards:  # no shard exceeds the limit unless it holds a single tensor
        tensors = load_file(str(s))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 64_000  # '64KB' = 64 000 bytes

    assert AutoGLMPhoneConfig.load(directory / CONFIG_NAME) == model.config
    loaded = AutoGLMPhoneForCausalLM.from_pretrained(directory)
    assert loaded.config == model.config
    assert not loaded.training
    assert_same_tensors(model, loaded)
    assert loaded.audio_tower.embed_positions.weight.requires_grad is False  # fixed table stays frozen
    assert torch.equal(media_logits(model), media_logits(loaded))


def test_parse_size_units():
    assert parse_size(123) == 123
    assert parse_size("2GB") == 2 * 10**9 and parse_size("2GiB") == 2 * 2**30  # as transformers
    assert parse_size("64KB") == 64_000 and parse_size("1.5 MiB") == 3 * 2**19
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_resaving_with_fewer_shards_removes_stale_ones(saved, tmp_path):
    model, directory = saved
    target = Path(shutil.copytree(directory, tmp_path / "resave"))
    model.save_pretrained(target)  # one 2 GB shard now
    assert [p.name for p in target.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert_same_tensors(model, AutoGLMPhoneForCausalLM.from_pretrained(target))


def test_fp16_round_trip_and_cast_on_load(tmp_path):
    model = AutoGLMPhoneForCausalLM.from_config(nano(), seed=1, dtype=torch.float16)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    with safe_open(str(next(tmp_path.glob("model-*.safetensors"))), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    state = model.state_dict()
    assert index_of(tmp_path)["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())

    kept = AutoGLMPhoneForCausalLM.from_pretrained(tmp_path)  # dtype=None keeps the checkpoint's
    assert_same_tensors(model, kept)
    assert torch.equal(media_logits(model), media_logits(kept))
    assert torch.equal(media_logits(model), media_logits(AutoGLMPhoneForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float16)))

    wide = AutoGLMPhoneForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, t in wide.state_dict().items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, state[name].float()), name  # fp16 -> fp32 is exact


def test_single_file_checkpoint_and_loading_into_a_built_model(saved, tmp_path):
    model, directory = saved
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(directory / CONFIG_NAME, tmp_path / CONFIG_NAME)
    assert_same_tensors(model, AutoGLMPhoneForCausalLM.from_pretrained(tmp_path))
    files = checkpoint_files(tmp_path / "model.safetensors")  # a file path works too
    assert set(files) == set(model.state_dict())


# ---- 2. clear errors ---------------------------------------------------------------------------------
def test_truncated_shard(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*(truncated|corrupt)"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)


def test_shard_renamed_on_disk(broken):
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.rename(broken / "renamed.safetensors")
    with pytest.raises(CheckpointError, match=rf"shard files that do not exist.*{shard.name}"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)


def _rename_in_shard(directory: Path, old: str, new: str, *, update_index: bool) -> None:
    index = index_of(directory)
    shard = directory / index["weight_map"][old]
    tensors = load_file(str(shard))
    tensors[new] = tensors.pop(old)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if update_index:
        index["weight_map"][new] = index["weight_map"].pop(old)
        (directory / INDEX_NAME).write_text(json.dumps(index))


def test_tensor_renamed_inside_checkpoint_lists_missing_and_unexpected(broken):
    old, new = "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_projection.weight"
    _rename_in_shard(broken, old, new, update_index=True)
    with pytest.raises(CheckpointError) as info:
        AutoGLMPhoneForCausalLM.from_pretrained(broken)
    msg = str(info.value)
    assert "does not match the model" in msg
    assert "missing (1)" in msg and old in msg
    assert "unexpected (1)" in msg and new in msg
    assert "wrong shape" not in msg


def test_tensor_renamed_in_shard_but_not_in_index(broken):
    old, new = "model.norm.weight", "model.final_norm.weight"
    _rename_in_shard(broken, old, new, update_index=False)
    with pytest.raises(CheckpointError, match=rf"not in their shard.*{old}"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)


def test_mis_shaped_tensor(broken):
    name = "vision_connector.weight"  # [text hidden 72, adapter hidden 56]
    index = index_of(broken)
    shard = broken / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :50].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong shape \(1\)") as info:
        AutoGLMPhoneForCausalLM.from_pretrained(broken)
    msg = str(info.value)
    assert name in msg and "(72, 50)" in msg and "(72, 56)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_directory_without_checkpoint(broken):
    for f in broken.glob("model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)


def test_directory_without_config(broken, tmp_path):
    (broken / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        AutoGLMPhoneForCausalLM.from_pretrained(tmp_path / "does-not-exist")


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_corrupt_index(broken):
    (broken / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        AutoGLMPhoneForCausalLM.from_pretrained(broken)


# ---- 3. the tokenizer travels with the checkpoint ---------------------------------------------------
SMALL = SchedulerConfig(max_num_seqs=2, max_model_len=64)


def test_engine_checkpoint_without_a_tokenizer_is_an_error(broken, monkeypatch):
    """A real checkpoint never silently gets the byte tokenizer; asking for it by name works."""
    def no_weights(*a, **k):
        raise AssertionError("the tokenizer is checked before the weights load")

    with monkeypatch.context() as m:
        m.setattr(AutoGLMPhoneForCausalLM, "from_pretrained", no_weights)
        with pytest.raises(TokenizerNotFoundError, match=f"{re.escape(str(broken))}: no tokenizer.json") as e:
            Engine.from_pretrained(broken, backend="reference", scheduler=SMALL)
    assert "--tokenizer bytes" in str(e.value) and "--tokenizer PATH" in str(e.value)
    engine = Engine.from_pretrained(broken, tokenizer="bytes", backend="reference", scheduler=SMALL)
    assert isinstance(engine.tokenizer, ByteTokenizer)
    assert isinstance(Engine.from_preset("nano", backend="reference", scheduler=SMALL).tokenizer, ByteTokenizer)


def test_engine_save_pretrained_writes_the_tokenizer(tmp_path):
    preset = Engine.from_preset("nano", backend="reference", scheduler=SMALL)
    preset.save_pretrained(tmp_path / "bytes")
    assert isinstance(Engine.from_pretrained(tmp_path / "bytes", backend="reference", scheduler=SMALL).tokenizer,
                      ByteTokenizer)
    _, config = glm_test_tokenizer(tmp_path / "src")
    model = AutoGLMPhoneForCausalLM.from_config(config, seed=1)
    engine = Engine(model, tmp_path / "src", backend="reference", scheduler=SMALL)
    engine.save_pretrained(tmp_path / "hf")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    loaded = Engine.from_pretrained(tmp_path / "hf", backend="reference", scheduler=SMALL)
    tok = loaded.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.special_ids == engine.tokenizer.special_ids
    image = tok.special_ids["<|image|>"]  # the file's added token (300), not GLM-4.1V's 151343
    assert image == loaded.config.image_token_id == 300
    req = loaded.add_request(messages=[{"role": "user", "content": [{"type": "image", "image": demo_image()},
                                                                     {"type": "text", "text": "hi"}]}])
    assert image in loaded.requests[req].prompt_ids
    mismatched = config.to_dict() | {"image_token_id": config.image_token_id + 1}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(mismatched))
    with pytest.raises(ValueError, match="model config says 301"):
        Engine.from_pretrained(tmp_path / "hf", backend="reference", scheduler=SMALL)


# ---- 4. memory: never two copies -------------------------------------------------------------------
MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from autoglm_fast.config import AutoGLMPhoneConfig
    from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM

    def status(field):  # VmHWM: this process's peak RSS; ru_maxrss is inherited across fork+exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    with torch.device("meta"):  # warm up: the first module construction maps in ~150 MB of torch itself
        AutoGLMPhoneForCausalLM(AutoGLMPhoneConfig.preset("nano"))
    before = status("VmRSS")
    model = AutoGLMPhoneForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
    with torch.no_grad():  # page every weight in (shards are memory-mapped, so untouched ones cost nothing)
        for p in model.parameters():
            p.sum()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps({"before": before, "peak": status("VmHWM"), "params": params, "dtypes": dtypes}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc")
def test_loading_does_not_hold_two_copies(tmp_path):
    config = nano()
    config = dataclasses.replace(config, text=dataclasses.replace(
        config.text, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, vocab_size=32000))
    model = AutoGLMPhoneForCausalLM.from_config(config, seed=0, dtype=torch.float16)
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    del model
    total = index_of(tmp_path)["metadata"]["total_size"]
    assert total > 100 * 2**20 and len(list(tmp_path.glob("model-*.safetensors"))) >= 3

    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["params"] == total and r["dtypes"] == ["torch.float16"]
    grew = r["peak"] - r["before"]
    # One copy is ~1.0x total; a second copy anywhere (clone, whole-shard read, fp32 detour) is >= 2x.
    assert grew < 1.5 * total + 16 * 2**20, f"loading {total / 2**20:.0f} MB grew RSS by {grew / 2**20:.0f} MB"
