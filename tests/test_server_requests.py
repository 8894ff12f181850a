"""What the server refuses, and how (tests/live_server.py runs it): malformed requests, fields it does not
implement, bodies over the size limit; each an OpenAI error naming the field, and the server survives."""
import argparse
import base64
import http.client
import json

import pytest

from live_server import (MODEL, data_url, httpx, live, media_dir, openai_error, png_bytes, post, serve,  # noqa: F401
                         user)
from autoglm_fast.server.cli import add_arguments


# ---- bad input -------------------------------------------------------------------------------------------------
def _bad_cases(config):
    img = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
    return [
        ("not json", 400, None), ("[1, 2]", 400, None),
        ({**user("hi"), "model": "gpt-4"}, 404, "model"),
        ({}, 400, "messages"), ({"messages": []}, 400, "messages"), ({"messages": "hi"}, 400, "messages"),
        ({"messages": [1]}, 400, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (user(""), 400, "messages"),
        (user([{"type": "video_url", "video_url": {"url": "x"}}]), 400, "messages[0].content[0].type"),
        (user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]), 400,
         "messages[0].content[0]"),
        (user([{"type": "image_url", "image_url": {"url": data_url(b"not an image")}}]), 400, "messages"),
        (user([{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]), 400,
         "messages[0].content[0]"),
        (user([{"type": "image_url", "image_url": {"url": "../secret.png"}}]), 400, "messages[0].content[0]"),
        (user([{"type": "image_url", "image_url": {"url": "escape.png"}}]), 400, "messages[0].content[0]"),
        (user([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]), 400, "messages[0].content[0]"),
        (user([{"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]), 400,
         "messages[0].content[0]"),
        (user([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFjunk").decode(),
                                                        "format": "wav"}}]), 400, "messages"),
        (user([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]), 400,
         "messages[0].content[0]"),
        (user([img, img, img, {"type": "text", "text": "three"}]), 400, "messages"),
        (user("long " * 400), 400, "messages"),
        ({**user("hi"), "temperature": -1}, 400, "temperature"),
        ({**user("hi"), "top_p": 1.5}, 400, "top_p"),
        ({**user("hi"), "top_k": -5}, 400, "top_k"),
        ({**user("hi"), "max_tokens": 0}, 400, "max_tokens"),
        ({**user("hi"), "max_completion_tokens": "many"}, 400, "max_completion_tokens"),
        ({**user("hi"), "frequency_penalty": 5}, 400, "frequency_penalty"),
        ({**user("hi"), "n": 2}, 400, "n"),
        ({**user("hi"), "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
        ({**user("hi"), "stream": "yes"}, 400, "stream"),
        ({**user("hi"), "enable_thinking": "yes"}, 400, "enable_thinking"),
    ]


def test_bad_inputs_get_openai_errors_and_the_server_survives(live):
    cases = _bad_cases(live.engine.config)
    assert len(cases) >= 20
    for body, status, param in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
            else {"json": body}
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60, **kw)
        assert r.status_code == status, (body if isinstance(body, str) else list(body), r.text)
        err = openai_error(r, status)
        assert err["param"] == param, (err, param)
    r = httpx.get(live.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert live.engine.cache.num_free_blocks == live.engine.cache.capacity
    assert post(live, {**user("still there?"), "max_tokens": 2}).status_code == 200


NO_TOOL = [{"type": "function", "function": {"name": "tap", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("extra, param", [
    ({"tools": NO_TOOL}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [NO_TOOL[0]["function"]]}, "functions"), ({"function_call": {"name": "tap"}}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"store": True}, "store"), ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"chat_template_kwargs": {"tools": NO_TOOL}}, "chat_template_kwargs.tools"),
    ({"messages": [{"role": "assistant", "content": "ok", "tool_calls": [{"id": "1", "type": "function"}]},
                   {"role": "user", "content": "hi"}]}, "messages[0].tool_calls"),
])
def test_unimplemented_fields_are_refused_by_name(live, extra, param):
    err = openai_error(post(live, {**user("hi"), "max_tokens": 1, "stream": True, **extra}), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert param.rsplit(".", 1)[-1].split("[")[0] in err["message"], err


def test_fields_that_ask_for_nothing_are_accepted(live):
    """What the article's clients send, and values of unimplemented fields that ask for nothing."""
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": True,
               "functions": None, "logit_bias": {}, "modalities": ["text"], "store": False, "user": "phone-1",
               "metadata": {"k": "v"}, "seed": 1, "stop": ["\n\n"], "n": 1, "service_tier": "auto",
               "stream_options": {"include_usage": True, "include_obfuscation": False}}
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "h", "name": "bob"},
            {"role": "assistant", "content": "a", "reasoning_content": "r", "tool_calls": []},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes()),
                                                                          "detail": "auto"}}]}]
    phone = {"model": MODEL, "temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2, "max_tokens": 2}
    for body in ({**phone, **user("hi"), **neutral}, {**phone, "messages": msgs, "stream": True}):
        r = post(live, body)
        assert r.status_code == 200, r.text


def _chunked(raw: bytes):
    return (raw[i:i + 65536] for i in range(0, len(raw), 65536))


def test_request_body_limit(request):
    """Over the limit: 413 before decoding (an over-size body of invalid JSON is a 413, not a 400), with a
    Content-Length and chunked; under it: served."""
    live = serve(request, max_body_bytes=1 << 20)
    big = json.dumps({**user("hi"), "max_tokens": 1, "user": "x" * (1536 << 10)}).encode()
    small = json.dumps({**user("hi"), "max_tokens": 1, "user": "x" * (900 << 10)}).encode()
    url, headers = live.url + "/v1/chat/completions", {"content-type": "application/json"}
    for raw in (big, b"{" * len(big)):
        for content, framing in ((raw, "content-length"), (_chunked(raw), "transfer-encoding")):
            r = httpx.post(url, content=content, headers=headers, timeout=60)
            assert list(r.request.headers).count("content-length") == (framing == "content-length")
            err = openai_error(r, 413)
            assert err["code"] == "request_too_large" and str(1 << 20) in err["message"]
    assert httpx.post(url, content=small, headers=headers, timeout=60).status_code == 200
    assert httpx.post(url, content=_chunked(small), headers=headers, timeout=60).status_code == 200


def test_default_body_limit_is_64_mib(live):
    """A declared Content-Length over 64 MiB gets a 413 at once, the body unsent; the CLI option's default."""
    conn = http.client.HTTPConnection(live.url.removeprefix("http://"), timeout=20)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str((64 << 20) + 1))
    conn.endheaders(b"{")  # and nothing more: the server must not wait for the other 64 MiB
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).max_body_bytes == 64 << 20
    assert parser.parse_args(["--max-body-mb", "1.5"]).max_body_bytes == 1536 << 10
