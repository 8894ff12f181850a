"""The OpenAI-compatible HTTP API: a thin FastAPI layer over `AsyncEngine`.

    app = create_app(Engine.from_preset("nano"))
    uvicorn.run(app, host="0.0.0.0", port=8000)

Bad input is answered with OpenAI's error JSON and a 4xx before anything is queued; a stream that
fails later sends an error event and `data: [DONE]`. A request whose client goes away is aborted
(its KV blocks are freed) from a task of its own, outside the cancelled response.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import THINK_OPEN, Glm45ReasoningParser, ReasoningParser, split_glm45, split_reasoning
from ..engine import AsyncEngine, Engine
from .limits import DEFAULT_MAX_BODY_BYTES, read_body
from .metrics import Metrics
from .protocol import (APIError, ChatRequest, chunk, completion, error_body, logprob_entries, message_fields,
                       new_id, parse_chat_request, usage)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _request_failed(out) -> APIError:
    """A request the engine ended with an error: bad input (the engine's ValueError/TypeError) is the
    client's 400, anything else the server's 500."""
    status = 400 if (out.error or "").startswith(("ValueError", "TypeError")) else 500
    return APIError(status, out.error or "the request failed")


class Server:
    def __init__(self, engine: Engine, served_model_name: str, api_key: str | None,
                 allowed_local_media_path: str | None, max_queued: int, max_images: int, reasoning_format: str,
                 max_body_bytes: int, reasoning_parser: str | None = None):
        if reasoning_format not in ("separate", "inline"):
            raise ValueError(f"reasoning_format must be 'separate' or 'inline', got {reasoning_format!r}")
        if reasoning_parser not in (None, "glm45"):
            raise ValueError(f"reasoning_parser must be None or 'glm45', got {reasoning_parser!r}")
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
        self.engine, self.aengine = engine, AsyncEngine(engine)
        self.model, self.api_key = served_model_name, api_key
        self.allowed, self.max_queued, self.max_images = allowed_local_media_path, max_queued, max_images
        self.inline, self.max_body_bytes = reasoning_format == "inline", max_body_bytes
        # A model that writes its own <think> (GLM-4.1V): its text goes out as generated, unless the
        # glm45 parser splits it (vLLM's flags); a prompt that opens <think> is split as before.
        self.opens_think, self.reasoning_parser = engine.runtime.prompt_opens_think, reasoning_parser
        self.metrics, self.in_flight, self.created = Metrics(), 0, int(time.time())
        self._cleanups: set[asyncio.Task] = set()

    # ---- one request's outputs, with metrics and a guaranteed abort ------------------------------------
    async def outputs(self, chat: ChatRequest, rid: str):
        agen = self.aengine.stream(messages=chat.messages, params=chat.params,
                                   enable_thinking=chat.enable_thinking, request_id=rid)
        start, first, last, outcome = time.monotonic(), None, None, "abort"
        try:
            try:
                out = await agen.__anext__()
            except (ValueError, TypeError) as e:
                outcome = "rejected"
                raise APIError(400, str(e), "messages",
                               "context_length_exceeded" if "max_model_len" in str(e) else None) from None
            while True:
                if out.token_ids:
                    now = time.monotonic()
                    first = first or now
                    last = now
                if out.finished:
                    outcome = out.finish_reason
                    self.metrics.prompt_tokens += out.prompt_tokens
                    self.metrics.generated_tokens += out.completion_tokens
                    if first is not None:
                        self.metrics.ttft.observe(first - start)
                        if out.completion_tokens > 1:
                            self.metrics.tpot.observe((last - first) / (out.completion_tokens - 1))
                yield out
                if out.finished:
                    return
                out = await agen.__anext__()
        finally:
            self.in_flight -= 1
            self.metrics.requests[outcome] += 1
            if outcome == "abort":  # client gone (or cancelled): free the request outside this cancel scope
                task = asyncio.get_running_loop().create_task(self._abort(agen, rid))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)

    async def _abort(self, agen, rid: str) -> None:
        try:
            await agen.aclose()
        finally:
            await self.aengine.abort(rid)

    # ---- chat completions ---------------------------------------------------------------------------------
    async def chat(self, request: Request):
        try:
            body = json.loads(await read_body(request, self.max_body_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        chat = parse_chat_request(body, model_name=self.model, max_model_len=self.engine.sched_config.max_model_len,
                                  max_images=self.max_images, allowed_local_media_path=self.allowed)
        if self.in_flight >= self.max_queued:
            self.metrics.requests["rejected"] += 1
            raise APIError(429, f"the server is busy ({self.in_flight} requests in flight); retry later",
                           code="too_many_requests")
        self.in_flight += 1
        rid = new_id()
        gen = self.outputs(chat, rid)
        try:
            first = await gen.__anext__()  # bad input raises here, before any response is started
        except BaseException:
            await gen.aclose()
            raise
        if first.finish_reason == "error":  # failed at admission (media encoding): nothing was streamed yet
            await gen.aclose()
            raise _request_failed(first)
        if chat.stream:
            return StreamingResponse(self._stream(chat, rid, first, gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(chat, rid, first, gen)

    def _thinking_shown_inline(self, chat: ChatRequest) -> bool:
        return self.opens_think and self.inline and chat.enable_thinking and chat.return_reasoning

    def _parser(self, chat: ChatRequest):
        """(streaming parser or None for text as generated, whether reasoning goes out separately)."""
        if not self.opens_think:
            glm45 = self.reasoning_parser == "glm45"
            return (Glm45ReasoningParser() if glm45 else None), glm45
        if self._thinking_shown_inline(chat):
            return None, False
        return ReasoningParser(chat.enable_thinking), chat.return_reasoning and not self.inline

    async def _complete(self, chat: ChatRequest, rid: str, out, gen):
        text, logprobs = "", []
        while True:
            text += out.text
            logprobs += out.logprobs or []
            if out.finished:
                break
            out = await gen.__anext__()
        if out.finish_reason == "error":
            raise _request_failed(out)
        if not self.opens_think:
            message = ({"content": text} if self.reasoning_parser is None
                       else message_fields(*split_glm45(text), return_reasoning=True))
        elif self._thinking_shown_inline(chat):
            message = {"content": THINK_OPEN + text}
        else:
            reasoning, content = split_reasoning(text, chat.enable_thinking)
            message = message_fields(reasoning if chat.enable_thinking else None, content,
                                     chat.return_reasoning and not self.inline)
        lp = {"content": logprob_entries(self.engine.tokenizer, logprobs)} if chat.logprobs else None
        return completion(rid, self.model, message, out.finish_reason,
                          usage(out), lp)

    async def _stream(self, chat: ChatRequest, rid: str, out, gen):
        parser, separate = self._parser(chat)
        try:
            yield _sse(chunk(rid, self.model, {"role": "assistant", "content": ""}))
            if self._thinking_shown_inline(chat):
                yield _sse(chunk(rid, self.model, {"content": THINK_OPEN}))
            while True:
                if out.finish_reason == "error":
                    yield _sse(error_body(out.error or "the request failed", "server_error"))
                    break
                reasoning, content = parser.feed(out.text) if parser else ("", out.text)
                if out.finished and parser:
                    r, c = parser.finish()
                    reasoning, content = reasoning + r, content + c
                delta = {"content": content} if content else {}
                if separate and reasoning:
                    delta["reasoning_content"] = delta["reasoning"] = reasoning
                lp = ({"content": logprob_entries(self.engine.tokenizer, out.logprobs)}
                      if chat.logprobs and out.logprobs else None)
                if delta or lp:
                    yield _sse(chunk(rid, self.model, delta, logprobs=lp))
                if out.finished:
                    yield _sse(chunk(rid, self.model, {}, out.finish_reason))
                    if chat.include_usage:
                        yield _sse(chunk(rid, self.model, None, usage_=usage(out)))
                    break
                out = await gen.__anext__()
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band, never hang
            yield _sse(error_body(f"{type(e).__name__}: {e}", "server_error"))
        finally:
            await gen.aclose()
        yield "data: [DONE]\n\n"


def create_app(engine: Engine, served_model_name: str = "autoglm-phone-9b", api_key: str | None = None,
               allowed_local_media_path: str | None = None, max_queued: int = 256, max_images: int = 8,
               reasoning_format: str = "separate", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               reasoning_parser: str | None = None) -> FastAPI:
    """max_queued: requests in flight (queued or running) beyond which new ones get 429; max_body_bytes:
    request bodies larger than this get 413 before they are decoded; reasoning_parser: "glm45" splits
    `<think>` from a model that writes its own (vLLM's flag), None passes its text on as generated."""
    server = Server(engine, served_model_name, api_key, allowed_local_media_path, max_queued, max_images,
                    reasoning_format, max_body_bytes, reasoning_parser)
    app = FastAPI(title="autoglm-fast", version="0.1.0")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), code=str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if server.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {server.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                e = APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                             code="invalid_api_key")
                return JSONResponse(e.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model, "object": "model", "created": server.created,
                                            "owned_by": "autoglm-fast",
                                            "max_model_len": engine.sched_config.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(engine, server.in_flight),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(request)

    return app
