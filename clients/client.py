"""`Client` and `AsyncClient`: the emo-serve HTTP API on httpx.

    from clients import Client

    with Client("http://127.0.0.1:8000", api_key="KEY") as c:
        out = c.complete("def add(a, b):", profile="python", max_tokens=32)
        print(out.text, out.profile)
        stream = c.complete("def add(a, b):", profile="python", stream=True)
        for delta in stream:          # text deltas as they arrive
            print(delta, end="")
        print(stream.finish_reason)

Retries: only answers 429 and 503 (the queue is full) and connection failures
before any byte of an answer came back are retried, `max_retries` times, with
exponential backoff and jitter; a `Retry-After` header wins over the computed
delay. Every other error is raised at once as an `EmoError` subclass that
carries the server's message (see `clients.errors`).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Iterable, Iterator, Literal, Mapping, overload

import httpx

from .errors import (
    APIConnectionError,
    APITimeoutError,
    EmoError,
    error_from_event,
    error_from_response,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Health,
    ModelInfo,
    ProfileInfo,
)

__version__ = "0.1.0"

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: connect quickly or fail; a long generation may take minutes to answer.
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: the only statuses retried: the server's queue is full.
RETRY_STATUSES = frozenset({429, 503})

TimeoutTypes = float | httpx.Timeout | None


def normalize_base_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/` and `http://h:8000/v1` all name the server root."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(now if now is not None else time.time(), tz=timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def _is_retryable_connect_error(exc: Exception) -> bool:
    """True when the request certainly got no answer: nothing to duplicate or lose."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True
    # A pooled keep-alive connection the server had closed: h11 reports that
    # it closed before sending any byte of a response.
    return isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc)


def _wrap_transport_error(exc: httpx.HTTPError, url: str) -> EmoError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to {url} timed out: {exc}")
    return APIConnectionError(f"could not talk to {url}: {exc}")


# -- server-sent events ---------------------------------------------------------


class SSEDecoder:
    """Turns the lines of a `text/event-stream` body into the events' `data`.

    Follows the SSE rules (events end at a blank line, several `data:` lines
    join with newlines, comments start with `:`), and also accepts streams whose
    events are single `data:` lines with no blank line between them.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def _pending_is_complete(self) -> bool:
        text = "\n".join(self._data)
        if text.strip() == "[DONE]":
            return True
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    def feed(self, line: str) -> list[str]:
        line = line.rstrip("\r\n")
        out: list[str] = []
        if line == "":
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return out
        if line.startswith(":"):
            return out
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            if self._data and self._pending_is_complete():
                out.append("\n".join(self._data))
                self._data = []
            self._data.append(value)
        return out

    def flush(self) -> list[str]:
        if not self._data:
            return []
        out = ["\n".join(self._data)]
        self._data = []
        return out


class _StreamState:
    """What a stream learned so far: ids, per-choice text and finish reasons."""

    def __init__(self, chunk_type: type[CompletionChunk] | type[ChatCompletionChunk]) -> None:
        self._chunk_type = chunk_type
        self.id: str | None = None
        self.model: str | None = None
        self.profile: str | None = None
        self.texts: dict[int, str] = {}
        self.finish_reasons: dict[int, str | None] = {}
        self.usage = None
        self.done = False

    @property
    def text(self) -> str:
        """All text of choice 0 received so far."""
        return self.texts.get(0, "")

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons.get(0)

    def parse(self, data: str):
        """The chunk in one event's data; None at `[DONE]`."""
        if data.strip() == "[DONE]":
            self.done = True
            return None
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise EmoError(f"bad event from server: {data[:200]!r}") from exc
        if isinstance(payload, dict) and "error" in payload and not payload.get("choices"):
            raise error_from_event(payload)
        chunk = self._chunk_type.model_validate(payload)
        self.id = chunk.id or self.id
        self.model = chunk.model or self.model
        self.profile = chunk.profile or self.profile
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            delta = _delta_text(choice)
            self.texts[choice.index] = self.texts.get(choice.index, "") + delta
            if choice.finish_reason is not None or choice.index not in self.finish_reasons:
                self.finish_reasons[choice.index] = choice.finish_reason
        return chunk


def _delta_text(choice: Any) -> str:
    if hasattr(choice, "text"):
        return choice.text or ""
    delta = getattr(choice, "delta", None)
    if delta is None:
        return ""
    if isinstance(delta, dict):
        return delta.get("content") or ""
    return getattr(delta, "content", None) or ""


class CompletionStream(_StreamState):
    """A streamed completion. Iterating yields text deltas as they arrive.

    After (or during) iteration: `text`, `texts` (per choice index),
    `finish_reason`, `profile`, `model`, `id`, `usage` (if the server sent it).
    `iter_chunks()` yields the parsed chunks instead of text. A stream can be
    consumed once; leaving early closes the connection (use `with`).
    """

    def __init__(self, response: httpx.Response, chunk_type=CompletionChunk) -> None:
        super().__init__(chunk_type)
        self._response = response
        self._started = False

    def iter_chunks(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError("this stream was already consumed")
        self._started = True
        decoder = SSEDecoder()
        url = str(self._response.request.url)
        try:
            for line in self._response.iter_lines():
                for data in decoder.feed(line):
                    chunk = self.parse(data)
                    if chunk is None:
                        return
                    yield chunk
            for data in decoder.flush():
                chunk = self.parse(data)
                if chunk is None:
                    return
                yield chunk
        except httpx.HTTPError as exc:
            raise _wrap_transport_error(exc, url) from exc
        finally:
            self._response.close()

    def __iter__(self) -> Iterator[str]:
        for chunk in self.iter_chunks():
            for choice in chunk.choices:
                delta = _delta_text(choice)
                if delta:
                    yield delta

    def read_all(self) -> str:
        """Consume the whole stream; the text of choice 0."""
        for _ in self.iter_chunks():
            pass
        return self.text

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> "CompletionStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncCompletionStream(_StreamState):
    """The async twin of `CompletionStream`: `async for delta in stream`."""

    def __init__(self, response: httpx.Response, chunk_type=CompletionChunk) -> None:
        super().__init__(chunk_type)
        self._response = response
        self._started = False

    async def iter_chunks(self) -> AsyncIterator[Any]:
        if self._started:
            raise RuntimeError("this stream was already consumed")
        self._started = True
        decoder = SSEDecoder()
        url = str(self._response.request.url)
        try:
            async for line in self._response.aiter_lines():
                for data in decoder.feed(line):
                    chunk = self.parse(data)
                    if chunk is None:
                        return
                    yield chunk
            for data in decoder.flush():
                chunk = self.parse(data)
                if chunk is None:
                    return
                yield chunk
        except httpx.HTTPError as exc:
            raise _wrap_transport_error(exc, url) from exc
        finally:
            await self._response.aclose()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self.iter_chunks():
            for choice in chunk.choices:
                delta = _delta_text(choice)
                if delta:
                    yield delta

    async def read_all(self) -> str:
        async for _ in self.iter_chunks():
            pass
        return self.text

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> "AsyncCompletionStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


# -- the part both clients share -------------------------------------------------


class _Core:
    def __init__(
        self,
        base_url: str | None,
        *,
        api_key: str | None,
        model: str | None,
        timeout: TimeoutTypes,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        max_retry_after: float,
        profile_in_model: bool,
        headers: Mapping[str, str] | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = normalize_base_url(base_url or os.environ.get("EMO_BASE_URL") or DEFAULT_BASE_URL)
        self.api_key = api_key if api_key is not None else os.environ.get("EMO_API_KEY") or None
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.profile_in_model = profile_in_model
        self._headers = {"User-Agent": f"emo-client/{__version__}", "Accept": "application/json"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"
        self._headers.update(headers or {})
        self._discovered_model: str | None = None

    # retry delay: exponential with "equal jitter", or what the server asked for
    def retry_delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        if response is not None:
            after = parse_retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(after, self.max_retry_after)
        cap = min(self.backoff_max, self.backoff_base * (2**attempt))
        return cap / 2 + random.uniform(0, cap / 2)

    def _pick_model(self, models: list[ModelInfo]) -> str | None:
        for m in models:
            if ":" not in m.id:
                return m.id
        return models[0].base if models else None

    def _completion_body(
        self,
        prompt: Any,
        model: str | None,
        profile: str | None,
        stream: bool,
        sampling: Mapping[str, Any],
        key: str = "prompt",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if model is not None:
            body["model"] = model
        body[key] = prompt
        if profile is not None:
            if self.profile_in_model and model is not None:
                body["model"] = f"{model.split(':', 1)[0]}:{profile}"
            else:
                body["profile"] = profile
        if stream:
            body["stream"] = True
        for name, value in sampling.items():
            if value is not None:
                body[name] = value
        return body


def _parse_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise EmoError(
            f"server answered {response.status_code} with a body that is not JSON: {response.text[:200]!r}",
            status=response.status_code,
        ) from exc


def _data_list(payload: Any) -> list[Any]:
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        return payload["data"]
    if isinstance(payload, list):
        return payload
    raise EmoError(f"expected an OpenAI list object, got {str(payload)[:200]!r}")


class Client(_Core):
    """Synchronous client. Thread-safe for concurrent calls (httpx.Client is).

    Args:
        base_url: server root, with or without `/v1` (env `EMO_BASE_URL`,
            default http://127.0.0.1:8000).
        api_key: sent as `Authorization: Bearer KEY` (env `EMO_API_KEY`).
        model: model sent when a call names none; if None, the first base
            model of `GET /v1/models` is used (looked up once).
        timeout: seconds, or an `httpx.Timeout`; per call with `timeout=`.
        max_retries: retries after a 429/503 or a failed connection.
        backoff_base, backoff_max: the n-th retry waits about
            min(backoff_max, backoff_base * 2**n) (half of it jittered).
        max_retry_after: the longest `Retry-After` honoured, in seconds.
        profile_in_model: send a profile as `model: <base>:<profile>` instead of
            the `profile` field; use it behind a router that routes on `model`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_retry_after: float = 60.0,
        profile_in_model: bool = False,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            profile_in_model=profile_in_model,
            headers=headers,
        )
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(base_url=self.base_url, timeout=timeout)

    # -- plumbing
    def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
    ) -> httpx.Response:
        url = self.base_url + path
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                url,
                json=json_body,
                headers=self._headers,
                timeout=self.timeout if timeout == "default" else timeout,
            )
            try:
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                if _is_retryable_connect_error(exc) and attempt < self.max_retries:
                    time.sleep(self.retry_delay(attempt))
                    attempt += 1
                    continue
                raise _wrap_transport_error(exc, url) from exc
            try:
                if response.status_code >= 400:
                    raw = response.read()
                    response.close()
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        time.sleep(self.retry_delay(attempt, response))
                        attempt += 1
                        continue
                    raise error_from_response(
                        response.status_code, raw, response.headers, response.reason_phrase
                    )
                if not stream:
                    response.read()
                    response.close()
            except httpx.HTTPError as exc:
                response.close()
                raise _wrap_transport_error(exc, url) from exc
            return response

    def _get_json(self, path: str, timeout: TimeoutTypes | Literal["default"] = "default") -> Any:
        return _parse_json(self._send("GET", path, timeout=timeout))

    def _resolve_model(self, model: str | None) -> str | None:
        if model is not None:
            return model
        if self.model is not None:
            return self.model
        if self._discovered_model is None:
            self._discovered_model = self._pick_model(self.models())
        return self._discovered_model

    # -- API
    @overload
    def complete(
        self, prompt: Any, *, profile: str | None = ..., model: str | None = ...,
        stream: Literal[False] = ..., timeout: TimeoutTypes | Literal["default"] = ..., **sampling: Any,
    ) -> Completion: ...

    @overload
    def complete(
        self, prompt: Any, *, profile: str | None = ..., model: str | None = ...,
        stream: Literal[True], timeout: TimeoutTypes | Literal["default"] = ..., **sampling: Any,
    ) -> CompletionStream: ...

    def complete(
        self,
        prompt: Any,
        *,
        profile: str | None = None,
        model: str | None = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
        **sampling: Any,
    ) -> Completion | CompletionStream:
        """`POST /v1/completions`.

        `prompt`: a string, a list of strings, or token ids. `profile`: the
        domain profile (`"full"`, `"auto"` or a profile name). `sampling`:
        `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `n`,
        `logprobs`, `echo`, or any other field the server accepts (None values
        are left out). With `stream=True` returns a `CompletionStream` (iterate
        it for text deltas); errors before the stream starts are raised here.
        """
        body = self._completion_body(prompt, self._resolve_model(model), profile, stream, sampling)
        response = self._send("POST", "/v1/completions", json_body=body, stream=stream, timeout=timeout)
        if stream:
            return CompletionStream(response, CompletionChunk)
        return Completion.model_validate(_parse_json(response))

    def stream(self, prompt: Any, *, profile: str | None = None, model: str | None = None,
               timeout: TimeoutTypes | Literal["default"] = "default", **sampling: Any) -> CompletionStream:
        """Same as `complete(..., stream=True)`."""
        return self.complete(prompt, profile=profile, model=model, stream=True, timeout=timeout, **sampling)

    def chat(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        profile: str | None = None,
        model: str | None = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
        **sampling: Any,
    ) -> ChatCompletion | CompletionStream:
        """`POST /v1/chat/completions` (models whose tokenizer has a chat template)."""
        body = self._completion_body(
            [dict(m) for m in messages], self._resolve_model(model), profile, stream, sampling, key="messages"
        )
        response = self._send("POST", "/v1/chat/completions", json_body=body, stream=stream, timeout=timeout)
        if stream:
            return CompletionStream(response, ChatCompletionChunk)
        return ChatCompletion.model_validate(_parse_json(response))

    def models(self) -> list[ModelInfo]:
        """`GET /v1/models`: the base model and each `<base>:<profile>`."""
        return [ModelInfo.model_validate(m) for m in _data_list(self._get_json("/v1/models"))]

    def profiles(self) -> list[ProfileInfo]:
        """`GET /v1/profiles`: experts, bytes, coverage, residency of each profile."""
        return [ProfileInfo.model_validate(p) for p in _data_list(self._get_json("/v1/profiles"))]

    def health(self, timeout: TimeoutTypes | Literal["default"] = "default") -> Health:
        """`GET /health`."""
        return Health.model_validate(self._get_json("/health", timeout=timeout))

    def metrics(self) -> str:
        """`GET /metrics`, Prometheus text."""
        return self._send("GET", "/metrics").text

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Core):
    """Asynchronous client; the same arguments and methods as `Client`, awaited.

        async with AsyncClient(url) as c:
            out = await c.complete("Hello", profile="prose")
            stream = await c.complete("Hello", profile="prose", stream=True)
            async for delta in stream:
                ...
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        max_retry_after: float = 60.0,
        profile_in_model: bool = False,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            profile_in_model=profile_in_model,
            headers=headers,
        )
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._model_lock: asyncio.Lock | None = None

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
    ) -> httpx.Response:
        url = self.base_url + path
        attempt = 0
        while True:
            request = self._http.build_request(
                method,
                url,
                json=json_body,
                headers=self._headers,
                timeout=self.timeout if timeout == "default" else timeout,
            )
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                if _is_retryable_connect_error(exc) and attempt < self.max_retries:
                    await asyncio.sleep(self.retry_delay(attempt))
                    attempt += 1
                    continue
                raise _wrap_transport_error(exc, url) from exc
            try:
                if response.status_code >= 400:
                    raw = await response.aread()
                    await response.aclose()
                    if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                        await asyncio.sleep(self.retry_delay(attempt, response))
                        attempt += 1
                        continue
                    raise error_from_response(
                        response.status_code, raw, response.headers, response.reason_phrase
                    )
                if not stream:
                    await response.aread()
                    await response.aclose()
            except httpx.HTTPError as exc:
                await response.aclose()
                raise _wrap_transport_error(exc, url) from exc
            return response

    async def _get_json(self, path: str, timeout: TimeoutTypes | Literal["default"] = "default") -> Any:
        return _parse_json(await self._send("GET", path, timeout=timeout))

    async def _resolve_model(self, model: str | None) -> str | None:
        if model is not None:
            return model
        if self.model is not None:
            return self.model
        if self._discovered_model is None:
            if self._model_lock is None:
                self._model_lock = asyncio.Lock()
            async with self._model_lock:
                if self._discovered_model is None:
                    self._discovered_model = self._pick_model(await self.models())
        return self._discovered_model

    async def complete(
        self,
        prompt: Any,
        *,
        profile: str | None = None,
        model: str | None = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
        **sampling: Any,
    ) -> Completion | AsyncCompletionStream:
        """`POST /v1/completions`; see `Client.complete`."""
        body = self._completion_body(prompt, await self._resolve_model(model), profile, stream, sampling)
        response = await self._send("POST", "/v1/completions", json_body=body, stream=stream, timeout=timeout)
        if stream:
            return AsyncCompletionStream(response, CompletionChunk)
        return Completion.model_validate(_parse_json(response))

    async def stream(self, prompt: Any, *, profile: str | None = None, model: str | None = None,
                     timeout: TimeoutTypes | Literal["default"] = "default",
                     **sampling: Any) -> AsyncCompletionStream:
        return await self.complete(prompt, profile=profile, model=model, stream=True, timeout=timeout, **sampling)

    async def chat(
        self,
        messages: Iterable[Mapping[str, Any]],
        *,
        profile: str | None = None,
        model: str | None = None,
        stream: bool = False,
        timeout: TimeoutTypes | Literal["default"] = "default",
        **sampling: Any,
    ) -> ChatCompletion | AsyncCompletionStream:
        body = self._completion_body(
            [dict(m) for m in messages], await self._resolve_model(model), profile, stream, sampling,
            key="messages",
        )
        response = await self._send("POST", "/v1/chat/completions", json_body=body, stream=stream,
                                    timeout=timeout)
        if stream:
            return AsyncCompletionStream(response, ChatCompletionChunk)
        return ChatCompletion.model_validate(_parse_json(response))

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in _data_list(await self._get_json("/v1/models"))]

    async def profiles(self) -> list[ProfileInfo]:
        return [ProfileInfo.model_validate(p) for p in _data_list(await self._get_json("/v1/profiles"))]

    async def health(self, timeout: TimeoutTypes | Literal["default"] = "default") -> Health:
        return Health.model_validate(await self._get_json("/health", timeout=timeout))

    async def metrics(self) -> str:
        return (await self._send("GET", "/metrics")).text

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


__all__ = [
    "Client",
    "AsyncClient",
    "CompletionStream",
    "AsyncCompletionStream",
    "SSEDecoder",
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "RETRY_STATUSES",
    "normalize_base_url",
    "parse_retry_after",
]
