"""bf16 end to end: the engine in bf16 against the same engine in fp32, judged by how far a plain bf16
forward of the same model is from its fp32 forward (the "same-dtype eager" distance).

- Greedy tokens are equal, except that the runs may part at a known bf16 flip: a step where fp32's two
  best tokens were within twice the eager bf16 error of each other.
- Until they part, the engine's logprobs are within 3x that eager distance of fp32's. The distance is
  measured where the engine's logprobs are: at fp32's two best tokens of every step.

The reference backend runs here on any machine; the fast backend's bf16 needs `tl.dot` on bf16 tiles,
which the interpreter gets wrong, so it runs on a GPU only.
"""
import copy

import pytest
import torch

from agreement import assert_same_greedy
from autoglm_fast.config import AutoGLMPhoneConfig
from autoglm_fast.demo import demo_image, demo_tone
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from autoglm_fast.reference.model import AutoGLMPhoneForCausalLM
from kernel_harness import DEVICE, FACTOR, requires_kernels

SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=160)
GREEDY = SamplingParams.greedy(max_tokens=8, ignore_eos=True, logprobs=2)


def _run(engine):
    """Three requests (text, image, audio) batched; per request its Request and its logprobs."""
    pytest.importorskip("PIL")
    tone = demo_tone(engine.config, seconds=0.5)
    ids = [engine.add_request("What is on the screen?", GREEDY),
           engine.add_request("Describe it.", GREEDY, images=[demo_image(48)]),
           engine.add_request("What do you hear?", GREEDY, audio=[tone])]
    reqs, logprobs = [engine.requests[i] for i in ids], {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            logprobs[out.request_id] += out.logprobs or []
    return reqs, [logprobs[i] for i in ids]


@torch.no_grad()
def _eager_logprobs(model, req, tokens, dtype):
    """log_softmax of one full forward (no cache, no batching) over the prompt and `tokens`, in `dtype`."""
    m, device = req.media, model.lm_head.weight.device
    ids = torch.tensor([req.prompt_ids + tokens], device=device)
    kw = {}
    if "pixel_values" in m:
        kw["pixel_values"] = m["pixel_values"].to(device, dtype)
    if "waveforms" in m:  # the engine computes the log-mel at admission, on the model's device
        from autoglm_fast.reference.audio_processing import log_mel_spectrogram
        features = log_mel_spectrogram(m["waveforms"].to(device), model.config.audio)
        kw.update(input_features=features.to(dtype), audio_num_samples=m["num_samples"])
    logits = model(ids, **kw).logits[0, len(req.prompt_ids) - 1:-1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("fast", marks=[pytest.mark.gpu, requires_kernels])])
def test_bf16_engine_is_as_close_to_fp32_as_the_eager_bf16_forward(backend):
    model32 = AutoGLMPhoneForCausalLM.from_config(AutoGLMPhoneConfig.preset("nano"), seed=0, device=DEVICE)
    with torch.no_grad():  # larger than the 0.02 init: logits of a real model's spread, not all near zero
        for p in model32.parameters():
            p.mul_(3.0)
    model16, model64 = copy.deepcopy(model32).to(torch.bfloat16), copy.deepcopy(model32).double()
    reqs, want = _run(Engine(copy.deepcopy(model32), backend="reference", scheduler=SCHED))
    _, got = _run(Engine(copy.deepcopy(model16), backend=backend, scheduler=SCHED))
    eager_err = 0.0
    for req, lps in zip(reqs, want):
        tokens = [lp["token_id"] for lp in lps]
        top = torch.tensor([[t for t, _ in lp["top"]] for lp in lps], device=DEVICE)  # fp32's two best, each step
        exact = _eager_logprobs(model64, req, tokens, torch.float64).gather(-1, top)
        eager = _eager_logprobs(model16, req, tokens, torch.bfloat16).gather(-1, top)
        eager_err = max(eager_err, (eager - exact).abs().max().item())
    assert eager_err > 0
    assert_same_greedy(got, want, gap=2 * eager_err)
    for r, (g, w) in enumerate(zip(got, want)):
        for step, (a, b) in enumerate(zip(g, w)):
            if a["token_id"] != b["token_id"]:
                break
            err = abs(a["logprob"] - b["logprob"])
            assert err <= FACTOR * eager_err, \
                f"request {r} step {step}: logprob off by {err:.3g}, eager {eager_err:.3g}"
