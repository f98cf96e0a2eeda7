"""API keys (Bearer, constant-time comparison) and the request body size limit."""

from __future__ import annotations

import hmac
import json

from fastapi import Request

from .errors import APIError


def require_api_key(request: Request) -> None:
    keys: list[bytes] = request.app.state.emo.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    ok = False
    for k in keys:  # compare against every key, always: no early exit that timing could reveal
        ok |= hmac.compare_digest(given, k)
    if not ok:
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", None, "invalid_api_key")


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
