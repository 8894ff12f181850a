"""Weight-only int8 / int4 on whole models: how far the logits move (KL divergence from fp32 over 64 generated
positions), that the fast and reference backends agree on a quantized model, that quantizing at load streams
layer by layer, that an AWQ checkpoint loads with no flag, and the 9B presets' weight bytes (meta device).

Bounds: mean KL(fp32 || quantized) per generated position. Measured here (seed 0; int4 in groups of 32, the
tiny widths being 64-152, zero-padded to whole groups): the trained nano checkpoint int8 3.0e-4, int4 0.17 (its
int4 weights are 7.7 % off in relative norm, as 4 bits over a group's range give, vs 0.6 % for int8); the random
tiny GLM-4.1V int8 3.5e-6, int4 5.6e-4. The bounds sit 3-6x above, below what a broken code path gives
(zero points read one step off: test_kl_bound_fails_a_broken_quantization).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from autoglm_fast.families.glm4v.model import Glm4vForConditionalGeneration
from autoglm_fast.quant import QuantLinear
from autoglm_fast.quant.quantize import QuantConfig, StreamingQuantizer, quant_targets
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from autoglm_fast.train.eval import default_checkpoint
from agreement import assert_same_greedy
from glm4v_checkpoint import save_checkpoint, tiny_config
from kernel_harness import requires_kernels
from test_awq import write_awq_checkpoint

INT8, INT4 = QuantConfig("int8"), QuantConfig("int4", group_size=32)
KL_BOUND = {("nano", "int8"): 1.5e-3, ("nano", "int4"): 0.5, ("glm4v", "int8"): 2e-5, ("glm4v", "int4"): 3e-3}
STEPS = 64


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids[None])
    return (out.logits if hasattr(out, "logits") else out)[0].float()


def _kl_over_generation(model, quantized, prompt: list[int]) -> float:
    """Mean KL(fp32 || quantized) of the next-token distributions at STEPS greedy positions of the fp32 model."""
    ids = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(STEPS):
            ids = torch.cat([ids, _logits(model, ids)[-1].argmax()[None]])
        positions = slice(len(prompt) - 1, len(ids) - 1)
        p = F.log_softmax(_logits(model, ids)[positions], -1)
        q = F.log_softmax(_logits(quantized, ids)[positions], -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def _nano(quantization=None):
    return AutoGLMPhoneForCausalLM.from_pretrained(default_checkpoint(), quantization=quantization)


def _glm4v(quantization=None):
    return Glm4vForConditionalGeneration.from_config(tiny_config(), seed=0, quantization=quantization)


@pytest.mark.parametrize("build", [_nano, _glm4v], ids=["nano", "glm4v-tiny"])
@pytest.mark.parametrize("config", [INT8, INT4], ids=["int8", "int4"])
def test_kl_from_fp32_within_bound(build, config):
    kl = _kl_over_generation(build(), build(config), [5, 17, 42, 7, 99, 3])
    print(f"\n{build.__name__[1:]} {config.method}: mean KL over {STEPS} generated positions = {kl:.3g}")
    assert 0 < kl <= KL_BOUND[build.__name__[1:], config.method]


def test_kl_bound_fails_a_broken_quantization():
    """The int4 bound catches zero points read one step off (a dequantization bug)."""
    broken = _glm4v(INT4)
    for layer in broken.modules():
        if isinstance(layer, QuantLinear) and layer.bits == 4:
            layer.zeros.add_(1).clamp_(max=15)
    assert _kl_over_generation(_glm4v(), broken, [5, 17, 42, 7, 99, 3]) > KL_BOUND["glm4v", "int4"]


def test_quantized_layers_and_roles():
    """Decoder linears in the asked bits, lm_head in int8, the vision tower untouched unless asked."""
    model = _glm4v(INT4)
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, QuantLinear) and layer.mlp.gate_up_proj.bits == 4
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    assert not any(isinstance(m, QuantLinear) for m in model.model.visual.modules())
    towers = _glm4v(QuantConfig("int4", group_size=32, quantize_vision=True))
    assert any(isinstance(m, QuantLinear) for m in towers.model.visual.modules())
    counts = _glm4v().parameter_counts()
    assert model.parameter_counts() == counts  # a packed weight counts the weights it stands for
    assert model.weight_bytes()["language_model"] < _glm4v().weight_bytes()["language_model"]


def test_quantizing_at_load_streams(monkeypatch):
    """While a checkpoint loads, at most one target Linear holds full-precision data at a time."""
    ready, peak = StreamingQuantizer.ready, []

    def counting(self, model, name):
        ready(self, model, name)
        live = [n for n in self.targets if type(model.get_submodule(n)) is torch.nn.Linear
                and not model.get_submodule(n).weight.is_meta]
        peak.append(len(live))
    monkeypatch.setattr(StreamingQuantizer, "ready", counting)
    model = _nano(INT8)
    assert max(peak) <= 1 and len(quant_targets(model, INT8)) == 0  # every target replaced
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 3 * 6 + 1  # q, k, v, o, gate_up, down x 3 + head


def _engine_logprobs(engine) -> list[list[dict]]:
    params = SamplingParams.greedy(max_tokens=6, ignore_eos=True, logprobs=2)
    outs = engine.generate([[5, 17, 42, 7], [9, 3]], params)
    return [o.logprobs for o in outs]


@requires_kernels
@pytest.mark.parametrize("preset,config", [("nano", INT4), ("glm4v-tiny", INT8), ("glm4v-tiny", INT4)],
                         ids=["nano-int4", "glm4v-tiny-int8", "glm4v-tiny-int4"])  # nano int4: padded widths
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.gpu)],
                         ids=["fp32", "fp16"])
def test_fast_and_reference_backends_agree_quantized(preset, config, dtype):
    """The Triton GEMV / GEMM (decode steps from the static-buffer path; captured graphs on a GPU) against the
    dequantize-then-linear reference, on the same quantized weights."""
    sched = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64)
    kw = dict(quantization=config, scheduler=sched, load_vision=False, load_audio=False, dtype=dtype)
    fast = _engine_logprobs(Engine.from_preset(preset, backend="fast", cuda_graphs=True, **kw))
    reference = _engine_logprobs(Engine.from_preset(preset, backend="reference", **kw))
    tol = 1e-3 if dtype == torch.float32 else 3e-2  # fp16: the logits' own rounding, 11 bits over ~8 nats
    assert_same_greedy(fast, reference, gap=tol)
    for f, r in zip(fast, reference):
        for a, b in zip(f, r):
            if a["token_id"] != b["token_id"]:
                break  # a near tie parted the runs (assert_same_greedy allowed it): nothing after compares
            assert abs(a["logprob"] - b["logprob"]) < tol


@requires_kernels
def test_awq_checkpoint_loads_without_flags(tmp_path, capsys):
    fp_dir, awq_dir = tmp_path / "fp", tmp_path / "awq"
    save_checkpoint(fp_dir, "{% for m in messages %}{{ m.content }}{% endfor %}")
    expected = write_awq_checkpoint(fp_dir, awq_dir, group_size=32)
    engine = Engine.from_pretrained(awq_dir, backend="fast", cuda_graphs=True, dtype=torch.float32,
                                    scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                                              max_model_len=64))
    model = engine.model
    for name, weight in expected.items():
        module = model.get_submodule(name.removesuffix(".weight").replace("model.layers.", "model.language_model.layers.")
                                     if name.startswith("model.layers.") else name.removesuffix(".weight"))
        assert isinstance(module, QuantLinear) and module.bits == 4
        assert torch.equal(module.dequantize(torch.float32), weight), name
    assert not isinstance(model.lm_head, QuantLinear)  # AWQ left it in full precision: so do we
    reference = Engine.from_pretrained(awq_dir, backend="reference", dtype=torch.float32,
                                       scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64,
                                                                 max_model_len=64))
    assert_same_greedy(_engine_logprobs(engine), _engine_logprobs(reference), gap=1e-3)
    with pytest.raises(ValueError, match="already quantized"):
        Engine.from_pretrained(awq_dir, quantization="int8")
    from autoglm_fast.cli import main  # info sees the packed layers from the checkpoint's headers alone
    assert main(["info", "--model", str(awq_dir), "--dtype", "float32"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["quantization"] == "awq int4"
    assert memory["weight_bytes"]["total"] == sum(model.weight_bytes()[p] for p in ("language_model", "vision", "lm_head"))
    assert main(["generate", "--model", str(awq_dir), "--quantization", "awq", "--prompt", "hi", "--max-tokens", "1",
                 "--dtype", "float32"]) == 0  # vLLM's spelling, allowed for an AWQ checkpoint


def test_cli_options(capsys):
    import argparse

    from autoglm_fast.server.cli import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--preset", "nano", "--quantization", "int4", "--quantize-vision"])
    assert (args.quantization, args.quantize_vision) == ("int4", True)
    from autoglm_fast.cli import main
    assert main(["generate", "--preset", "nano", "--quantization", "awq", "--prompt", "hi"]) == 2
    assert "needs --model DIR of an AWQ checkpoint" in capsys.readouterr().err


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        Engine.from_preset("nano", quantization="int3")
    with pytest.raises(ValueError, match="quantize_vision needs"):
        Engine.from_preset("nano", quantize_vision=True)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig("int4", group_size=48)
    with pytest.raises(ValueError, match="quantized"):
        _nano(INT8).save_pretrained(tmp_path / "q")


# ---- the 9B presets on the meta device: the weight budgets -------------------------------------------
LIMITS = {  # (preset, method) -> bytes (the seed model in GB; GLM-4.1V int4 in GiB, see test below)
    ("autoglm-phone-9b", "int8"): 10e9, ("autoglm-phone-9b", "int4"): 6.5e9,
    ("glm-4.1v-9b", "int8"): 12e9, ("glm-4.1v-9b", "int4"): 7.5 * 2**30,
}


@pytest.mark.parametrize("preset,method", list(LIMITS))
def test_info_weight_totals_within_limits(preset, method, capsys):
    from autoglm_fast.cli import main
    assert main(["info", "--preset", preset, "--quantization", method]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["quantization"] == method
    assert memory["weight_bytes"]["total"] <= LIMITS[preset, method]
    if preset == "glm-4.1v-9b":  # ... and one 24 GB card holds >= 16k tokens of KV cache next to it
        assert memory["kv_tokens_per_card"]["24 GiB"] >= 16384
        assert method == "int8" or memory["kv_tokens_per_card"]["12 GiB"] >= 16384


def test_glm41v_int4_floor_is_above_7_5_decimal_gb():
    """Why the GLM-4.1V int4 limit is read in GiB: with the embeddings and the ViT in fp16 and lm_head in int8
    (the issue's rules), 4-bit decoder weights with no scales at all already take more than 7.5e9 bytes."""
    from autoglm_fast.families import family_for_preset
    with torch.device("meta"):
        model = family_for_preset("glm-4.1v-9b").model_cls(family_for_preset("glm-4.1v-9b").preset("glm-4.1v-9b"))
    lm = model.model.language_model
    decoder = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    floor = decoder / 2 + 2 * lm.embed_tokens.weight.numel() + 2 * sum(
        p.numel() for p in model.model.visual.parameters()) + model.lm_head.weight.numel()
    assert 7.5e9 < floor < 7.5 * 2**30
