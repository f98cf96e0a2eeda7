"""Exceptions raised by the emo-serve client.

The server answers errors as ``{"error": {"message", "type", "param", "code"}}``
with status 400/401/404/413/429/503. `EmoError` carries those fields as they
came; `str(err)` shows the status and the server's own message.
"""

from __future__ import annotations

import json
from typing import Any, Mapping


class EmoError(Exception):
    """Any error the client raises. `status` is None when no HTTP answer came."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        head = f"HTTP {self.status}" if self.status is not None else "error"
        kind = f" {self.type}" if self.type else ""
        param = f" (param: {self.param})" if self.param else ""
        return f"{head}{kind}: {self.message}{param}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, message={self.message!r})"


class APIConnectionError(EmoError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class APIStatusError(EmoError):
    """The server answered with an error status."""


class BadRequestError(APIStatusError):  # 400
    pass


class AuthenticationError(APIStatusError):  # 401
    pass


class PermissionDeniedError(APIStatusError):  # 403
    pass


class NotFoundError(APIStatusError):  # 404: unknown model or profile
    pass


class RequestTooLargeError(APIStatusError):  # 413: prompt over the context
    pass


class UnprocessableEntityError(APIStatusError):  # 422
    pass


class RateLimitError(APIStatusError):  # 429: queue full
    pass


class ServiceUnavailableError(APIStatusError):  # 503: queue full / not ready
    pass


class InternalServerError(APIStatusError):  # other 5xx
    pass


class StreamError(EmoError):
    """The server reported an error inside an event stream, after the 200."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _parse_error_body(raw: bytes | str) -> tuple[Any, dict[str, Any]]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text) if text else None
    except ValueError:
        return text, {"message": text.strip()}
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return body, err
        if isinstance(err, str):
            return body, {"message": err}
        detail = body.get("detail")  # FastAPI's default shape
        if isinstance(detail, str):
            return body, {"message": detail}
        if detail is not None:
            return body, {"message": json.dumps(detail)}
    return body, {"message": text.strip()}


def error_from_response(
    status: int, raw: bytes | str, headers: Mapping[str, str] | None = None, reason: str = ""
) -> APIStatusError:
    """The exception for an HTTP error answer, carrying the server's message."""
    body, err = _parse_error_body(raw)
    message = err.get("message") or reason or f"HTTP {status}"
    if status in _BY_STATUS:
        cls = _BY_STATUS[status]
    elif status >= 500:
        cls = InternalServerError
    else:
        cls = APIStatusError
    return cls(
        str(message),
        status=status,
        type=err.get("type"),
        param=err.get("param"),
        code=err.get("code"),
        body=body,
        headers=headers,
    )


def error_from_event(payload: Mapping[str, Any]) -> StreamError:
    err = payload.get("error")
    if not isinstance(err, Mapping):
        err = {"message": str(err)}
    return StreamError(
        str(err.get("message") or "error in event stream"),
        status=None,
        type=err.get("type"),
        param=err.get("param"),
        code=err.get("code"),
        body=dict(payload),
    )


__all__ = [
    "EmoError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "ServiceUnavailableError",
    "InternalServerError",
    "StreamError",
    "error_from_response",
    "error_from_event",
]
