"""Weights I/O: our checkpoint format round trip, clear errors for broken checkpoints, Hugging Face
part checkpoints (GLM, CLIP, Whisper) mapped in by name, and loading without a second copy in memory."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from autoglm_fast.weights import (CONFIG_NAME, INDEX_NAME, CheckpointError, checkpoint_files, detect_hf_part,
                                  load_hf_weights, materialize)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
AUDIO_SAMPLES = 16000  # 1 s -> 50 encoder frames -> 13 audio tokens on nano


# ---- helpers --------------------------------------------------------------------------------------
def nano() -> AutoGLMPhoneConfig:
    return AutoGLMPhoneConfig.preset("nano")


def media_inputs(config: AutoGLMPhoneConfig, seed: int = 0):
    """ids with exactly the image and audio placeholder counts the media need, plus random media."""
    g = torch.Generator().manual_seed(seed)
    c = config
    n_img, n_aud = c.vision.num_tokens, c.audio.num_tokens(AUDIO_SAMPLES)
    text = torch.randint(0, 256, (12,), generator=g).tolist()
    ids = ([c.image_start_token_id] + [c.image_token_id] * n_img + [c.image_end_token_id]
           + [c.audio_start_token_id] + [c.audio_token_id] * n_aud + [c.audio_end_token_id] + text)
    s = c.vision.image_size
    pixel_values = torch.randn(1, c.vision.num_channels, s, s, generator=g)
    input_features = torch.randn(1, c.audio.num_mel_bins, 2 * c.audio.max_source_positions, generator=g)
    return torch.tensor([ids]), pixel_values, input_features


@torch.no_grad()
def media_logits(model: AutoGLMPhoneForCausalLM, seed: int = 0) -> torch.Tensor:
    ids, px, feats = media_inputs(model.config, seed)
    dtype = model.lm_head.weight.dtype
    return model(ids, pixel_values=px.to(dtype), input_features=feats.to(dtype),
                 audio_num_samples=[AUDIO_SAMPLES]).logits


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
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 64 * 1024

    assert AutoGLMPhoneConfig.load(directory / CONFIG_NAME) == model.config
    loaded = AutoGLMPhoneForCausalLM.from_pretrained(directory)
    assert loaded.config == model.config
    assert not loaded.training
    assert_same_tensors(model, loaded)
    assert loaded.audio_tower.embed_positions.weight.requires_grad is False  # fixed table stays frozen
    assert torch.equal(media_logits(model), media_logits(loaded))


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


# ---- 3. Hugging Face part checkpoints ---------------------------------------------------------------
def hf_glm(vocab_size: int = 300):
    cfg = transformers.GlmConfig(vocab_size=vocab_size, hidden_size=72, intermediate_size=152, num_hidden_layers=3,
                                 num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5},
                                 rms_norm_eps=1.5625e-7, pad_token_id=0, attn_implementation="eager")
    return jitter(transformers.GlmForCausalLM(cfg))


VISION_KW = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 image_size=42, patch_size=14)
WHISPER_KW = dict(d_model=40, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=80, num_mel_bins=80,
                  max_source_positions=100, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16,
                  vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  decoder_start_token_id=3, attn_implementation="eager")


@torch.no_grad()
def jitter(model):
    """Non-trivial norms and biases, so no parameter hides behind its init."""
    torch.manual_seed(0)
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_save(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


def built_nano() -> AutoGLMPhoneForCausalLM:
    return AutoGLMPhoneForCausalLM.from_config(nano(), seed=7)


@torch.no_grad()
def our_text_logits(model: AutoGLMPhoneForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None]
    return model.lm_head(model.model(model.model.embed_tokens(ids), positions))


def test_hf_glm_checkpoint(tmp_path):
    hf = hf_glm()
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(hf_save(hf, tmp_path)) == "glm"
    ours = model.state_dict()
    hf_state = {k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert set(hf_state) == {k for k in ours if k.startswith(("model.", "lm_head."))}
    for k, v in hf_state.items():
        assert torch.equal(ours[k], v), k
    for k, v in before.items():  # the other parts are untouched
        if not k.startswith(("model.", "lm_head.")):
            assert torch.equal(ours[k], v), k
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (our_text_logits(model, ids) - ref).abs().max() <= TOL


def test_hf_clip_vision_checkpoint(tmp_path):
    hf = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW,
                                                                           attn_implementation="eager")))
    path = hf_save(hf, tmp_path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        on_disk = set(f.keys())
    assert detect_hf_part(on_disk) == "clip"
    model = built_nano()
    assert model.load_hf_weights(path) == "clip"
    ours = model.state_dict()
    # transformers 5 writes CLIPVisionModel keys without `vision_model.` (4.x wrote it); either maps in.
    for k, v in hf.state_dict().items():
        k = k if k.startswith("vision_model.") else "vision_model." + k
        assert torch.equal(ours["vision_tower." + k], v), k
    assert len(hf.state_dict()) == sum(1 for k in ours if k.startswith("vision_tower."))
    px = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=px).last_hidden_state
        got = model.vision_tower(px)
    assert (got - ref).abs().max() <= TOL


def test_hf_clip_vision_checkpoint_with_prefixed_keys(tmp_path):
    """transformers 4.x layout: `vision_model.*` keys plus the `position_ids` buffer."""
    hf = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)))
    state = {"vision_model." + k: v.contiguous() for k, v in hf.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    model = built_nano()
    assert model.load_hf_weights(tmp_path) == "clip"
    for k, v in state.items():
        if not k.endswith("position_ids"):
            assert torch.equal(model.state_dict()["vision_tower." + k], v), k


def test_hf_full_clip_model_loads_vision_tower_only(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=VISION_KW, projection_dim=16)
    hf = jitter(transformers.CLIPModel(cfg))
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(hf_save(hf, tmp_path)) == "clip"
    ours = model.state_dict()
    for k, v in hf.vision_model.state_dict().items():
        assert torch.equal(ours["vision_tower.vision_model." + k], v), k
    for k, v in before.items():
        if not k.startswith("vision_tower."):
            assert torch.equal(ours[k], v), k
    px = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=px).last_hidden_state
    assert (model.vision_tower(px) - ref).abs().max() <= TOL


@pytest.mark.parametrize("cls", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_hf_whisper_checkpoint_ignores_the_decoder(tmp_path, cls):
    hf = jitter(getattr(transformers, cls)(transformers.WhisperConfig(**WHISPER_KW)))
    encoder = hf.get_encoder()
    path = hf_save(hf, tmp_path)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert any("decoder." in k for k in f.keys())  # the decoder is there, and must be skipped
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.load_hf_weights(path) == "whisper"
    ours = model.state_dict()
    enc_state = encoder.state_dict()
    assert set("audio_tower." + k for k in enc_state) == {k for k in ours if k.startswith("audio_tower.")}
    for k, v in enc_state.items():
        assert torch.equal(ours["audio_tower." + k], v), k
    for k, v in before.items():
        if not k.startswith("audio_tower."):
            assert torch.equal(ours[k], v), k
    feats = torch.randn(2, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = encoder(feats).last_hidden_state
        got = model.audio_tower(feats)
    assert (got - ref).abs().max() <= TOL


def test_bare_whisper_encoder_checkpoint(tmp_path):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    enc = jitter(WhisperEncoder(transformers.WhisperConfig(**WHISPER_KW)))
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = built_nano()
    assert model.load_hf_weights(tmp_path) == "whisper"
    for k, v in enc.state_dict().items():
        assert torch.equal(model.state_dict()["audio_tower." + k], v), k


def test_hf_glm_wrong_vocab_is_a_shape_error(tmp_path):
    model = built_nano()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"wrong shape \(2\)") as info:
        model.load_hf_weights(hf_save(hf_glm(vocab_size=320), tmp_path))
    msg = str(info.value)
    assert "(as glm)" in msg
    assert "model.embed_tokens.weight: checkpoint (320, 72) vs model (300, 72)" in msg
    assert "lm_head.weight: checkpoint (320, 72) vs model (300, 72)" in msg
    assert "missing" not in msg and "unexpected" not in msg
    for k, v in model.state_dict().items():  # checked before anything is written
        assert torch.equal(v, before[k]), k


def test_hf_checkpoint_errors(tmp_path):
    model = built_nano()
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="cannot tell which part"):
        model.load_hf_weights(tmp_path)
    with pytest.raises(ValueError, match="part must be one of"):
        model.load_hf_weights(tmp_path, part="t5")
    with pytest.raises(CheckpointError, match=r"missing \(\d+\).*unexpected \(1\):\s+foo\.weight"):
        model.load_hf_weights(tmp_path, part="clip")  # unprefixed key -> vision_tower.vision_model.foo.weight
    with pytest.raises(CheckpointError, match="no such file or directory"):
        model.load_hf_weights(tmp_path / "absent")


def test_hf_parts_into_a_meta_model_with_dtype_and_device(tmp_path):
    hf = hf_glm()
    clip = jitter(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)))
    hf_save(hf, tmp_path / "glm")
    hf_save(clip, tmp_path / "clip")
    with torch.device("meta"):
        model = AutoGLMPhoneForCausalLM(nano())
    assert load_hf_weights(model, tmp_path / "glm", dtype=torch.float16, device="cpu") == "glm"
    assert load_hf_weights(model, tmp_path / "clip", "clip", dtype=torch.float16, device="cpu") == "clip"
    ours = model.state_dict()
    for k, v in hf.state_dict().items():
        if "rotary_emb" not in k:
            assert ours[k].device.type == "cpu" and ours[k].dtype == torch.float16, k
            assert torch.equal(ours[k], v.half()), k
    for k, v in clip.state_dict().items():
        assert torch.equal(ours["vision_tower.vision_model." + k], v.half()), k
    assert all(t.is_meta for k, t in ours.items() if k.startswith(("audio_tower.", "fusion.", "vision_adapter.")))
    with pytest.raises(CheckpointError, match="left without data"):
        from autoglm_fast.weights import _check_materialized
        _check_materialized(model)

    materialize(model, dtype=torch.float16, device="cpu", seed=0)  # the rest: seeded random init
    filled = model.state_dict()
    assert not any(t.is_meta for t in filled.values())
    assert all(t.dtype == torch.float16 for t in filled.values())
    for k, v in hf.state_dict().items():  # loaded parameters untouched by materialize
        if "rotary_emb" not in k:
            assert torch.equal(filled[k], v.half()), k
    logits = media_logits(model.eval())
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


# ---- 4. memory: never two copies -------------------------------------------------------------------
MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM

    def rss_now():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    before = rss_now()
    model = AutoGLMPhoneForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps({"before": before, "peak": peak, "params": params, "dtypes": dtypes}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
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
    assert grew < 1.5 * total + 64 * 2**20, f"loading {total / 2**20:.0f} MB grew RSS by {grew / 2**20:.0f} MB"
