"""API keys (Bearer, constant-time comparison) for every route but the open ones,
the request body size limit, and log lines that a client's text cannot forge."""

from __future__ import annotations

import hmac
import json
import logging
import re

from fastapi import Request

from .errors import APIError


def _key_ok(keys: list[bytes], authorization: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for k in keys:  # compare against every key, always: no early exit that timing could reveal
        ok |= hmac.compare_digest(given, k)
    return ok


def _key_error() -> APIError:
    return APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    "authentication_error", None, "invalid_api_key")


def require_api_key(request: Request) -> None:
    keys: list[bytes] = request.app.state.emo.api_keys
    if keys and not _key_ok(keys, request.headers.get("authorization", "")):
        raise _key_error()


def is_open_path(path: str) -> bool:
    """Routes answered without the key: /health (probes), the /ui page (static
    files; its API calls carry the key) and /metrics (its route decides, by
    --public-metrics). Everything else, /openapi.json and unknown paths
    included, needs it."""
    return path in ("/health", "/metrics", "/ui") or path.startswith("/ui/")


class RequireKey:
    """Pure ASGI middleware: 401 for a request without a valid key on a path that
    is not open, before any routing (so a 404 tells nothing about what exists)."""

    def __init__(self, app, keys: list[bytes]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or is_open_path(scope["path"]):
            return await self.app(scope, receive, send)
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), "")
        if _key_ok(self.keys, auth):
            return await self.app(scope, receive, send)
        body = json.dumps(_key_error().body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: whatever a terminal
# or a log reader could take for a new line or an escape sequence
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: object) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, ...):
    a field a client chose (a URL path, a header) then fills one log line, never two."""
    s = str(text)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), s) if _CONTROL.search(s) else s


class PrintableFormatter(logging.Formatter):
    """The server's log format with `printable` applied to each message (a
    traceback, added after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class BodySizeLimit:
    """Pure ASGI middleware: 413 when a body is (or streams) past `max_bytes`."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    return await _reject(send, 400, "invalid Content-Length header", "invalid_request_error")
                if n > self.max_bytes:
                    return await _reject(send, 413, f"request body of {n} bytes is over the limit of "
                                                    f"{self.max_bytes} bytes", "invalid_request_error")
        seen = 0
        max_bytes = self.max_bytes

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge()
            return msg

        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send, 413, f"request body is over the limit of {max_bytes} bytes",
                              "invalid_request_error")


class BodyTooLarge(Exception):
    pass


async def _reject(send, status: int, message: str, etype: str) -> None:
    body = json.dumps({"error": {"message": message, "type": etype, "param": None,
                                 "code": "body_too_large" if status == 413 else None}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
