"""A mixed step (running decodes plus a new prompt's chunk) sends its decode rows to the decode kernel and
only the chunks to the prefill kernel, and gives every request what it gets run alone."""
import pytest
import torch

import autoglm_fast.fast.glm as fast_glm
from agreement import assert_same_greedy
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from kernel_harness import requires_kernels

SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24, max_model_len=96)
GREEDY = SamplingParams.greedy(max_tokens=4, ignore_eos=True, logprobs=2)
PROMPTS = ["short", "a prompt long enough for two chunks of the budget"]


def _engine():
    return Engine.from_preset("nano", seed=0, backend="fast", dtype=torch.float32, scheduler=SCHED)


@requires_kernels
def test_decode_rows_skip_the_prefill_kernel_and_mixed_equals_alone(monkeypatch):
    calls = []  # per attention launch: (kernel, query rows, sequences)

    def spy(name, fn):
        def wrapper(q, k_pool, v_pool, block_tables, seq_lens, *args, **kwargs):
            calls.append((name, q.shape[0], seq_lens.shape[0]))
            return fn(q, k_pool, v_pool, block_tables, seq_lens, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(fast_glm, "paged_prefill_attention", spy("prefill", fast_glm.paged_prefill_attention))
    monkeypatch.setattr(fast_glm, "paged_decode_attention", spy("decode", fast_glm.paged_decode_attention))
    engine, layers = _engine(), engine_layers()
    results = {}

    def step():
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.logprobs or [])

    first = engine.add_request(PROMPTS[0], GREEDY)
    while not engine.requests[first].output_ids:
        step()
    second = engine.add_request(PROMPTS[1], GREEDY)
    mixed = 0
    while engine.has_unfinished():
        before = len(calls)
        chunk = min(engine.requests[second].remaining, SCHED.max_num_batched_tokens - 1) \
            if second in engine.requests and engine.requests[second].remaining > 1 else 0
        decoding = first in engine.requests and engine.requests[first].remaining == 1
        step()
        launches = calls[before:]
        if chunk and decoding:  # a mixed step: per layer one decode launch of 1 row, one prefill of the chunk
            mixed += 1
            assert launches == [("decode", 1, 1), ("prefill", chunk, 1)] * layers, launches
        assert all(rows > 1 or kernel == "decode" for kernel, rows, _ in launches), launches
    assert mixed >= 2  # the second prompt came in two chunks, each beside the first one's decode
    alone = [_engine().generate([p], GREEDY)[0].logprobs for p in PROMPTS]
    assert_same_greedy([results[first], results[second]], alone, 1e-4)
    for got, want in zip([results[first], results[second]], alone):
        for a, b in zip(got, want):
            if a["token_id"] != b["token_id"]:
                break
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def engine_layers() -> int:
    from autoglm_fast.config import AutoGLMPhoneConfig
    return AutoGLMPhoneConfig.preset("nano").text.num_hidden_layers
