"""The engine on the nano preset: continuous batching gives every request what it gets alone, on
both backends; aborts and floods free every block; bad requests fail alone.

The engines run in float32 on every device (fp16 is the CUDA default). Greedy runs are compared token by
token through their logprobs (tests/agreement.py): batchings and backends compute in different shapes, so
the runs may part only at a near tie (two best tokens within NEAR_TIE), never at a clear choice."""
import io

import pytest
import torch

from autoglm_fast.demo import demo_image, demo_tone
from agreement import assert_same_greedy
from autoglm_fast.engine import Engine, SamplingParams, SchedulerConfig
from kernel_harness import requires_kernels

SCHED = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=128)
GREEDY = SamplingParams.greedy(max_tokens=5, ignore_eos=True, logprobs=2)
NEAR_TIE = 1e-4  # logprob gap: ~100x fp32 rounding of the nano logits; the runs' real gaps are 4e-4 and up


def _same(got, want):
    assert_same_greedy(got, want, NEAR_TIE)


def _engine(backend, **kw):
    kw.setdefault("dtype", torch.float32)
    return Engine.from_preset("nano", seed=0, backend=backend, scheduler=kw.pop("scheduler", SCHED), **kw)


def _requests(engine):
    pytest.importorskip("PIL")  # the demo image (the GPU check's machine may lack Pillow)
    tone = demo_tone(engine.config, seconds=0.5)
    return [dict(prompt="What is on the screen?"), dict(prompt="Describe it.", images=[demo_image(48)]),
            dict(prompt="What do you hear?", audio=[tone]),
            dict(prompt="Both?", images=[demo_image(64)], audio=[tone])]


def _solo(backend):
    engine = _engine(backend)
    return [engine.generate([r.pop("prompt")], GREEDY, **r)[0].logprobs for r in _requests(engine)]


def _staggered(engine):
    """Submit the four requests at different steps, as a server would; each one's per-token logprobs."""
    reqs, ids, tokens = _requests(engine), [], {}
    for step in range(200):
        if step % 2 == 0 and reqs:
            r = reqs.pop(0)
            ids.append(engine.add_request(r.pop("prompt"), GREEDY, **r))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.logprobs or [])
        if not reqs and not engine.has_unfinished():
            break
    assert engine.cache.num_free_blocks == engine.cache.capacity  # every block came back
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def reference_solo():
    return _solo("reference")


def test_reference_batched_equals_each_request_alone(reference_solo):
    _same(_staggered(_engine("reference")), reference_solo)


@requires_kernels
def test_fast_backend_matches_the_reference(reference_solo):
    _same(_staggered(_engine("fast")), reference_solo)


@requires_kernels
def test_decode_through_the_cuda_graph_buffers_matches(reference_solo):
    """The static, bucket-padded decode path that CUDA graphs replay (run eagerly without a GPU)."""
    engine = _engine("fast", cuda_graphs=True)
    assert engine.runner.graphs is not None and engine.cache.null_block is not None
    _same(_staggered(engine), reference_solo)  # decode batches of 1 and 2
    state = engine.graph_state  # on CUDA the graphs were captured and replayed; elsewhere eager, and it says so
    if torch.cuda.is_available():
        assert state.status == "captured" and state.replays > 0 and 1 in state.buckets, state
    else:
        assert state.status == "off" and "no CUDA" in state.reason and state.replays == 0


PROMPTS = ["one", "two two", "three three three"]  # a decode batch of 3, padded to the bucket of 4


@pytest.fixture(scope="module")
def reference_three():
    return _three(_engine("reference"))


def _three(engine):
    return [o.logprobs for o in engine.generate(PROMPTS, GREEDY)]


@requires_kernels
def test_cuda_graph_bucket_padding_matches(reference_three):
    _same(_three(_engine("fast", cuda_graphs=True)), reference_three)


@pytest.mark.gpu
def test_cuda_graphs_are_captured_and_replayed_on_cuda():
    """The production setup (fp16, graphs on by default on CUDA): a capture that falls back fails here."""
    engine = Engine.from_preset("nano", seed=0, backend="fast", scheduler=SCHED)
    assert engine.graph_state.status == "pending"
    outs = engine.generate(PROMPTS, GREEDY)  # decode at batch 3: bucket 4
    outs += engine.generate(["alone"], GREEDY)  # bucket 1
    state = engine.graph_state
    assert state.status == "captured" and state.reason is None, state
    assert state.buckets == (1, 4) and state.replays >= 2 * (GREEDY.max_tokens - 1)
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)


def _capturing(engine):
    """The engine's graphs as on CUDA (capture at each bucket's first decode step), on any device."""
    graphs = engine.runner.graphs
    graphs.capture = True
    assert engine.graph_state.status == "pending"
    return graphs


@requires_kernels
def test_a_failed_capture_falls_back_to_eager_decoding_and_says_so(reference_three, monkeypatch):
    engine = _engine("fast", cuda_graphs=True)
    graphs = _capturing(engine)

    def fail(key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", fail)
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        _same(_three(engine), reference_three)  # the requests lose speed, never tokens
    state = engine.graph_state
    assert state.status == "fallback" and "batch 4" in state.reason and "stream is capturing" in state.reason
    assert state.replays == 0 and state.buckets == ()


@requires_kernels
def test_replayed_decode_steps_are_counted(reference_three, monkeypatch):
    """Bookkeeping of the replay path, with a stand-in graph whose replay recomputes the static output."""
    engine = _engine("fast", cuda_graphs=True)
    graphs = _capturing(engine)

    def capture(key):  # as a real capture: the warm-up's effects on the batch's device state are undone
        saved = graphs._device_state()
        out = graphs._step(*key)
        graphs._restore(saved)
        graphs.graphs[key] = (type("Graph", (), {"replay": lambda self: out.copy_(graphs._step(*key))})(), out)

    monkeypatch.setattr(graphs, "_capture", capture)
    _same(_three(engine), reference_three)
    state = engine.graph_state
    assert state.status == "captured" and state.reason is None and state.buckets == (4,)
    assert state.replays == GREEDY.max_tokens - 1  # every decode step after the prefill
    assert _engine("reference").graph_state.status == "off"


def test_flood_larger_than_the_pool_preempts_and_still_matches():
    prompts = [f"request {i} word" for i in range(5)]  # 14 tokens (2 pages of 8) growing into a 3rd page
    solo = [_engine("reference").generate([p], GREEDY)[0].logprobs for p in prompts]
    small = _engine("reference", num_blocks=7, block_size=8)  # ~2 requests' worth of blocks
    outs = small.generate(prompts, GREEDY)
    _same([o.logprobs for o in outs], solo)
    assert all(o.finish_reason == "length" for o in outs)
    assert small.scheduler.num_preemptions > 0 and small.cache.num_free_blocks == 7


def test_abort_mid_stream_frees_its_blocks():
    engine = _engine("reference")
    keep = engine.add_request("a request that runs to the end", GREEDY)
    stream = engine.stream("a request that is aborted", SamplingParams.greedy(max_tokens=50, ignore_eos=True))
    first = next(stream)
    assert not first.finished
    stream.close()  # the consumer goes away: the request is aborted
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            finished[out.request_id] = out
    assert finished[keep].finish_reason == "length"
    assert engine.cache.num_free_blocks == engine.cache.capacity and not engine.requests


def test_stop_string_ends_the_text_exactly_before_it():
    engine = _engine("reference")
    full = engine.generate(["hello"], SamplingParams.greedy(max_tokens=12, ignore_eos=True))[0]
    text = full.text
    assert len(text) >= 3
    stop = text[1:3]
    out = _engine("reference").generate(["hello"], SamplingParams.greedy(max_tokens=12, stop=[stop],
                                                                         ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    a = _engine("reference").generate(["x"], params)[0].token_ids
    b = _engine("reference").generate(["x"], params)[0].token_ids
    c = _engine("reference").generate(["x"], SamplingParams(temperature=1.0, seed=8, max_tokens=6,
                                                            ignore_eos=True))[0].token_ids
    assert a == b and a != c


def test_bad_requests_fail_alone_with_clear_errors():
    engine = _engine("reference")
    good = engine.add_request("fine", GREEDY)
    with pytest.raises(ValueError, match="image"):
        engine.add_request("x", images=[b"not an image"])
    with pytest.raises(ValueError, match="audio"):
        engine.add_request("x", audio=[b"RIFF-but-not-really"])
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("y" * 200)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(messages=[{"role": "user", "content": "   "}])
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        engine.add_request()
    tokens, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == good  # nothing of the refused requests was queued
            tokens += out.token_ids
            last = out
    assert last.finish_reason == "length" and len(tokens) == 5 and last.completion_tokens == 5


def test_chat_messages_with_media_parts():
    pytest.importorskip("PIL")
    engine = _engine("reference")
    buf = io.BytesIO()
    demo_image(40).save(buf, format="PNG")
    out = engine.generate([None], GREEDY, messages=[{"role": "user", "content": [
        {"type": "image", "image": buf.getvalue()}, {"type": "text", "text": "what is this?"}]}])[0]
    assert len(out.token_ids) == 5 and out.prompt_tokens > engine.config.vision.num_tokens


def test_missing_modality_is_a_clear_error():
    pytest.importorskip("PIL")
    engine = Engine.from_preset("nano", backend="reference", load_vision=False, scheduler=SCHED)
    with pytest.raises(ValueError, match="load_vision=False"):
        engine.add_request("x", images=[demo_image(32)])
    assert engine.generate(["text still works"], GREEDY)[0].finish_reason == "length"


def test_async_streams_run_concurrently_and_abort_from_another_task():
    import asyncio

    from autoglm_fast.engine import AsyncEngine

    async def main():
        engine = _engine("reference")
        aengine = AsyncEngine(engine)

        async def collect(prompt, params):
            outs = [o async for o in aengine.stream(prompt, params)]
            return sum((o.logprobs or [] for o in outs), []), outs[-1]

        async def aborted():
            async for out in aengine.stream("to be cut", SamplingParams.greedy(max_tokens=100, ignore_eos=True)):
                if len(out.token_ids):
                    return "left early"

        results = await asyncio.gather(collect("first", GREEDY), collect("second", GREEDY), aborted())
        return engine, results

    engine, (first, second, third) = asyncio.run(main())
    solo = [_engine("reference").generate([p], GREEDY)[0].logprobs for p in ("first", "second")]
    _same([first[0], second[0]], solo)
    assert first[1].finish_reason == "length" and third == "left early"
    assert engine.cache.num_free_blocks == engine.cache.capacity and not engine.requests


def test_logprobs_are_returned_per_token():
    out = _engine("reference").generate(["hi"], SamplingParams.greedy(max_tokens=3, logprobs=2, ignore_eos=True))[0]
    assert [lp["token_id"] for lp in out.logprobs] == out.token_ids
    for lp in out.logprobs:
        top = lp["top"]
        assert len(top) == 2 and top[0][0] == lp["token_id"] and top[0][1] >= top[1][1]  # greedy: the best one
        assert lp["logprob"] == pytest.approx(top[0][1]) and lp["logprob"] <= 0


def test_from_pretrained_checkpoint_equals_the_preset(tmp_path):
    preset = _engine("reference")
    preset.save_pretrained(tmp_path)  # with its (byte) tokenizer, which loads back without an option
    loaded = Engine.from_pretrained(tmp_path, backend="reference", scheduler=SCHED)
    assert loaded.generate(["same weights"], GREEDY)[0].token_ids == preset.generate(["same weights"],
                                                                                      GREEDY)[0].token_ids


def test_media_placeholders_are_never_generated():
    """Sampled freely, the model could pick an image/audio placeholder id, which has no embedding."""
    engine = _engine("reference")
    cfg = engine.config

    class PlaceholdersFirst(torch.nn.Module):  # logits that rank the two placeholders above everything
        weight = engine.model.lm_head.weight  # what the engine reads dtype and device from

        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], cfg.text.vocab_size, device=h.device)
            out[..., cfg.audio_token_id], out[..., cfg.image_token_id] = 10.0, 9.0
            return out

    engine.model.lm_head = PlaceholdersFirst()
    out = engine.generate(["x"], GREEDY)[0]
    assert out.finish_reason == "length" and out.token_ids == [0] * 5  # the best token that is allowed


def test_a_failing_step_ends_every_async_stream_with_an_error():
    import asyncio

    from autoglm_fast.engine import AsyncEngine

    engine = _engine("reference")

    def broken_step():
        raise RuntimeError("boom")

    engine.step = broken_step

    async def main():
        aengine = AsyncEngine(engine)
        return [o async for o in aengine.stream("hi", GREEDY)]

    outs = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert outs[-1].finished and outs[-1].finish_reason == "error" and "boom" in outs[-1].error


def test_running_requests_never_exceed_max_num_seqs():
    """A token budget smaller than the running set leaves some running requests out of a step; new ones
    must still wait, since each running request holds a row of the persistent batch."""
    engine = _engine("reference", scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=3,
                                                             max_model_len=64))
    ids = [engine.add_request(f"prompt {i}", GREEDY) for i in range(4)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out if out.finished else done.get(out.request_id)
        assert len(engine.scheduler.running) <= 2 and len(engine.batch.row_of) <= 2
    assert all(done[i].completion_tokens == GREEDY.max_tokens for i in ids)


def test_log_mel_runs_at_admission_on_the_model_device(monkeypatch):
    """add_request decodes and resamples the audio (bad files fail there); Whisper's log-mel runs once, at
    the request's first step, on the model's device (a GPU's STFT, not the host's)."""
    import autoglm_fast.families.autoglm_phone as family
    from autoglm_fast.demo import demo_tone
    calls, log_mel = [], family.log_mel_spectrogram
    monkeypatch.setattr(family, "log_mel_spectrogram", lambda w, c: calls.append(w.device) or log_mel(w, c))
    engine = _engine("reference")
    rid = engine.add_request("What do you hear?", GREEDY, audio=[demo_tone(engine.config, seconds=0.5)])
    assert calls == [] and engine.requests[rid].media["waveforms"].shape == (1, engine.config.audio.chunk_samples)
    engine.step()
    assert calls == [engine.device]


def test_a_request_waits_for_its_encoders_while_others_run():
    """On CUDA the encoders run on their own stream and a request is scheduled once their event has
    completed; meanwhile the requests behind it prefill and decode. Here a stand-in event completes after
    a few polls."""
    class Pending:  # torch.cuda.Event's query(): False until the work is done
        def __init__(self, polls):
            self.polls = polls

        def query(self):
            self.polls -= 1
            return self.polls < 0

    pytest.importorskip("PIL")
    engine = _engine("reference")
    admit = engine.runtime.admit

    def slow_admit(req):
        admit(req)
        if req.media:
            req.encoded = Pending(polls=4)

    engine.runtime.admit = slow_admit
    picture = engine.add_request("Describe it.", GREEDY, images=[demo_image(48)])
    text = engine.add_request("What is on the screen?", GREEDY)
    order, got = [], {picture: [], text: []}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.logprobs or []
            if out.token_ids and out.request_id not in order:
                order.append(out.request_id)
    assert order == [text, picture]  # the text request did not wait behind the image's encoders
    alone = [_engine("reference").generate([p], GREEDY, **kw)[0].logprobs
             for p, kw in (("Describe it.", {"images": [demo_image(48)]}), ("What is on the screen?", {}))]
    _same([got[picture], got[text]], alone)
