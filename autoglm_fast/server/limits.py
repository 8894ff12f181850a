"""The request-body size limit, applied where the body is read, before any of it is decoded: a declared
Content-Length over the limit is refused before a byte is read; a body without one (chunked) is counted
as it arrives and refused at the first chunk that passes the limit, so at most the limit plus one chunk
is ever held. (In the request path rather than in ASGI middleware: the auth middleware reads the body in
a task of its own, where an error raised from `receive` would not reach the APIError handler.)"""
from __future__ import annotations

from starlette.requests import Request

from .protocol import APIError

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a phone agent sends several 3-6 MB base64 screenshots


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                    "(autoglm-fast serve --max-body-mb)", code="request_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)
