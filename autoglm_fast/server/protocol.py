"""OpenAI chat-completions wire format: parsing a request body into engine inputs, and building the
responses, chunks and error bodies. No FastAPI here; `APIError` carries the HTTP status."""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..sampling import SamplingParams
from .fields import CHAT_TEMPLATE_KWARGS, MESSAGE, REQUEST, STREAM_OPTIONS, Fields

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI name -> SamplingParams name; extras (top_k, min_p, repetition_penalty, ...) are vLLM's.
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "seed": "seed", "frequency_penalty": "frequency_penalty",
                   "presence_penalty": "presence_penalty", "repetition_penalty": "repetition_penalty",
                   "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "min_tokens": "min_tokens"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "not_found_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                                          else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _refuse_unsupported(fields: Fields, obj: dict, where: str = "") -> None:
    refused = fields.refused(obj, where)
    if refused is not None:
        raise APIError(400, refused[1], refused[0])


@dataclass
class ChatRequest:
    messages: list[dict]           # engine-shaped: image / audio parts carry bytes
    params: SamplingParams
    stream: bool
    include_usage: bool
    enable_thinking: bool
    return_reasoning: bool
    logprobs: bool


def _flag(body: dict, name: str, default: bool) -> bool:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise APIError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
    _refuse_unsupported(CHAT_TEMPLATE_KWARGS, kwargs, "chat_template_kwargs")
    value = body.get(name, kwargs.get(name, default))
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be a boolean, got {value!r}", name)
    return value


def parse_chat_request(body, *, model_name: str, max_model_len: int, max_images: int,
                       allowed_local_media_path: str | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")
    _refuse_unsupported(REQUEST, body)
    n = body.get("n")
    if n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got {n!r}", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    _refuse_unsupported(STREAM_OPTIONS, options, "stream_options")
    messages = _messages(body.get("messages"), max_images, allowed_local_media_path)
    return ChatRequest(messages, _sampling(body, max_model_len), stream, bool(options.get("include_usage")),
                       _flag(body, "enable_thinking", True), _flag(body, "return_reasoning", False),
                       body.get("logprobs") is True)


def _sampling(body: dict, max_model_len: int) -> SamplingParams:
    kwargs = {dst: body[src] for src, dst in SAMPLING_FIELDS.items() if body.get(src) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    kwargs["max_tokens"] = max_model_len if max_tokens is None else max_tokens
    if not isinstance(kwargs["max_tokens"], int) or isinstance(kwargs["max_tokens"], bool):
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise APIError(400, f"{name} must be an int >= 1, got {max_tokens!r}", name)
    stop = body.get("stop")
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
        if not isinstance(kwargs["stop"], list):
            raise APIError(400, "stop must be a string or a list of strings", "stop")
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise APIError(400, f"logprobs must be a boolean, got {logprobs!r}", "logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    if logprobs:
        kwargs["logprobs"] = 0 if top is None else top
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        name = str(e).split(" ", 1)[0]
        param = {"max_tokens": "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                 "logprobs": "top_logprobs"}.get(name, name)
        raise APIError(400, str(e), param) from None


def _messages(messages, max_images: int, allowed: str | None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out, images = [], 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = ROLES.get(msg.get("role"))
        if role is None:
            raise APIError(400, f"{where}: unsupported role {msg.get('role')!r}; expected one of {list(ROLES)}",
                           f"{where}.role")
        _refuse_unsupported(MESSAGE, msg, where)
        content = msg.get("content")
        if isinstance(content, list):
            parts = [_part(p, f"{where}.content[{k}]", allowed) for k, p in enumerate(content)]
            images += sum(p["type"] == "image" for p in parts)
            content = parts
        elif not isinstance(content, str):
            raise APIError(400, f"{where}: content must be a string or a list of parts", f"{where}.content")
        out.append({"role": role, "content": content})
    if images > max_images:
        raise APIError(400, f"too many images: {images} (this server allows {max_images} per request)", "messages")
    return out


def _part(part, where: str, allowed: str | None) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}: a text part needs a string 'text'", where)
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{where}: image_url needs a 'url' string", where)
        return {"type": "image", "image": _image_bytes(url, where, allowed)}
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise APIError(400, f"{where}: input_audio needs {{'data': base64 WAV, 'format': 'wav'}}", where)
        if spec.get("format", "wav") != "wav":
            raise APIError(400, f"{where}: only the 'wav' audio format is supported, got {spec.get('format')!r}",
                           where)
        return {"type": "audio", "audio": _b64(spec["data"], where)}
    raise APIError(400, f"{where}: unsupported content part type {kind!r}; expected text, image_url or "
                   "input_audio", f"{where}.type")


def _b64(data: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data is not valid base64", where) from None
    if not raw:
        raise APIError(400, f"{where}: the data is empty", where)
    return raw


def _image_bytes(url: str, where: str, allowed: str | None) -> bytes:
    if url.startswith("data:"):
        header, sep, data = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(400, f"{where}: a data URL must look like data:image/png;base64,...", where)
        return _b64(data, where)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: remote image URLs are not fetched; send a data: URL", where)
    if allowed is None:
        raise APIError(400, f"{where}: local image paths are disabled (start the server with "
                       "--allowed-local-media-path)", where)
    path = Path(unquote(url.removeprefix("file://")))
    root = Path(allowed).resolve()
    try:
        resolved = (path if path.is_absolute() else root / path).resolve(strict=True)  # follows symlinks
    except (OSError, RuntimeError):
        raise APIError(400, f"{where}: image file not found: {url!r}", where) from None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise APIError(400, f"{where}: {url!r} is outside the allowed media directory", where)
    return resolved.read_bytes()


# ---- responses ------------------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(out) -> dict:
    """A finished RequestOutput's usage, with the prompt tokens the prefix cache supplied (OpenAI's and
    vLLM's `prompt_tokens_details.cached_tokens`)."""
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


def logprob_entries(tokenizer, entries: list[dict]) -> list[dict]:
    """Engine logprobs -> OpenAI's `logprobs.content`, with a `token_id` extension field."""
    def tok(i, lp):
        s = tokenizer.decode([i])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8")), "token_id": i}
    return [dict(tok(e["token_id"], e["logprob"]), top_logprobs=[tok(i, lp) for i, lp in e["top"]])
            for e in entries]


def message_fields(reasoning: str, content: str, return_reasoning: bool) -> dict:
    fields = {"content": content}
    if return_reasoning:
        fields["reasoning_content"] = fields["reasoning"] = reasoning
    return fields


def completion(rid: str, model: str, message: dict, finish_reason: str, usage_: dict, logprobs=None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": logprobs,
                         "finish_reason": finish_reason}], "usage": usage_}


def chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None, logprobs=None,
          usage_: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
