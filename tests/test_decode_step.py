"""A decode step through the graph path touches the host once: the read-back of its sampled tokens.

Every tensor-to-Python conversion (`.item()`, `.tolist()`, `int()` / `bool()` / `float()` / `__index__` on
a tensor, `.cpu()`, `.numpy()`) is a blocking sync on a GPU, and every `torch.tensor(<host data>)` a
blocking host-to-device copy. The test counts those made outside installed packages (the project's
code and the tests; the Triton interpreter's and torch's own are not the engine's) in steady decode on
CPU, where the same static-buffer path the CUDA graphs capture runs eagerly."""
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from kernel_harness import requires_kernels

THEIRS = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")})
CONVERSIONS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy")
SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)


class HostTouches:
    """Counts, by call site, the syncs and host-data tensor builds made from this project's code."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "tensor", self._counting(torch.tensor, "torch.tensor"))

    def _counting(self, fn, name):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if not caller.f_code.co_filename.startswith(THEIRS):
                self.calls.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return fn(*args, **kwargs)
        return wrapper


def _steady_decode(engine, prompts, params, monkeypatch, steps=3, **media):
    for p in prompts:
        engine.add_request(p, params, **media)
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()  # prefill (and the first sampled tokens)
    touches = HostTouches(monkeypatch)
    per_step = []
    for _ in range(steps):
        before = len(touches.calls)
        outputs = engine.step()
        assert len(outputs) == len(prompts) and all(o.token_ids for o in outputs)
        per_step.append(touches.calls[before:])
    monkeypatch.undo()
    table = engine.batch.sampling  # what the steps kept on the device agrees with the host's token lists
    for req in engine.requests.values():
        row = engine.batch.row_of[req.request_id]
        assert table.last_token[row].item() == req.output_ids[-1]
        want = torch.bincount(torch.tensor(req.output_ids), minlength=table.vocab)
        assert table.output_counts[row].equal(want.to(torch.int32))
    return per_step


PLANS = {"greedy": SamplingParams.greedy(max_tokens=8, ignore_eos=True),
         "sampled, penalties, logprobs": SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_p=0.9,
                                                         top_k=20, min_p=0.01, frequency_penalty=0.3,
                                                         repetition_penalty=1.1, logprobs=3, min_tokens=6),
         "seeded (sampled eagerly after the graph)": SamplingParams(max_tokens=8, ignore_eos=True, seed=3, top_k=5)}


@requires_kernels
@pytest.mark.parametrize("plan", list(PLANS))
def test_nano_decode_step_reads_back_once(plan, monkeypatch):
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    long = "a prompt over two pages of 32 tokens, so that its blocks reach the graphs' tables in one step"
    per_step = _steady_decode(engine, ["one", "two two", long, "four four four"], PLANS[plan], monkeypatch)
    for calls in per_step:
        assert len(calls) <= 2 and sum("tolist" in c for c in calls) == 1, calls


@requires_kernels
def test_token_statistics_kept_on_the_device_match_the_reference():
    """Penalties and min_tokens read per-row counts the graph step updates itself; greedy runs with them
    equal the reference backend's (which samples from the same table, eagerly, step by step)."""
    from agreement import assert_same_greedy
    params = SamplingParams.greedy(max_tokens=7, frequency_penalty=1.5, repetition_penalty=1.3, presence_penalty=0.2,
                                   min_tokens=4, logprobs=2)
    prompts = ["one", "two two", "three three three"]
    runs = [Engine.from_preset("nano", seed=0, backend=b, dtype=torch.float32, scheduler=SCHED, **kw).generate(
        prompts, params) for b, kw in (("reference", {}), ("fast", {"cuda_graphs": True}))]
    assert_same_greedy(*([o.logprobs for o in run] for run in runs), gap=1e-4)
    assert all(len(set(o.token_ids)) > 2 for o in runs[1])  # the penalties are at work


@requires_kernels
def test_glm4v_decode_step_reads_back_once(monkeypatch):
    engine = Engine.from_preset("glm4v-tiny", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    c = engine.config
    prompts = [[5, 6, 7], [8, 9], [c.image_start_token_id, c.image_token_id, c.image_end_token_id, 10], [11] * 5]
    pytest.importorskip("PIL")
    from autoglm_fast.demo import demo_image
    engine.add_request(prompts.pop(2), PLANS["greedy"], images=[demo_image(56)])
    per_step = _steady_decode(engine, prompts, PLANS["greedy"], monkeypatch)
    for calls in per_step:
        assert len(calls) <= 2 and sum("tolist" in c for c in calls) == 1, calls


@requires_kernels
def test_the_counter_sees_a_sync(monkeypatch):
    """The instrument itself: the engine's eager path (no graphs) builds tensors from host data, and a
    `.item()` slipped into the graph path is caught."""
    engine = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED)
    per_step = _steady_decode(engine, ["one", "two"], PLANS["greedy"], monkeypatch, steps=1)
    assert sum("torch.tensor" in c for c in per_step[0]) >= 3, per_step
    graphs = Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED,
                                cuda_graphs=True)
    step = graphs.runner.graphs._step
    monkeypatch.setattr(graphs.runner.graphs, "_step", lambda *key: step(*key) + 0 * graphs.batch.staged[0, 0].item())
    per_step = _steady_decode(graphs, ["one", "two"], PLANS["greedy"], monkeypatch, steps=1)
    assert len(per_step[0]) == 2 and "item at test_decode_step.py" in per_step[0][0], per_step
