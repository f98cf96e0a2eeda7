"""Client tests over real sockets against a STAND-IN server written here.

The stand-in is a small FastAPI app run by uvicorn in a thread on 127.0.0.1 (a
real HTTP server, no mocking library). It speaks emo-serve's HTTP surface as
docs/http-api.md fixes it, and adds what the real server cannot be made to do on
demand: answer 429 twice then 200, always 503, fail in the middle of a stream,
close connections. It tests the client's own logic: retries and backoff,
error surfacing, SSE parsing, API keys, timeouts, the command.

The end-to-end client tests against the real `emo-serve` (and the `openai` SDK
test) live in tests/test_client_e2e.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402

from clients import (  # noqa: E402
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Completion,
    EmoError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    StreamError,
)
from clients import cli  # noqa: E402
from clients.client import SSEDecoder, normalize_base_url, parse_retry_after  # noqa: E402

API_KEY = "test-key"
# python: the shape emo-serve answers with; prose: plain numbers, which the client accepts too
PROFILES = {
    "python": {"name": "python", "id": "emo-demo:python", "kind": "folder",
               "experts_per_layer": {"0": 4, "1": 4}, "experts_total": 8,
               "bytes": {"experts": 1_048_576, "non_expert": 500_000, "total": 1_548_576},
               "coverage": {"0": 0.91, "1": 0.88}, "mean_coverage": 0.895, "resident": True,
               "resident_bytes": 1_048_576, "has_centroid": True},
    "prose": {"name": "prose", "experts_per_layer": [4, 4], "bytes": 2_097_152, "coverage": 0.8,
              "resident": False},
}
STREAM_PIECES = ["Hello", " from", " the", " stand", "-in"]


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


class StandIn:
    """The app plus a record of what it received."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()
        state = self

        @app.middleware("http")
        async def auth(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                if request.headers.get("authorization") != f"Bearer {API_KEY}":
                    return _error(401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key")
            return await call_next(request)

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": "emo-demo", "profiles": list(PROFILES)}

        @app.get("/metrics")
        async def metrics():
            return PlainTextResponse("# TYPE emo_queue_depth gauge\nemo_queue_depth 0\n")

        @app.get("/v1/models")
        async def models():
            data = [{"id": "emo-demo", "object": "model", "created": 1, "owned_by": "emo-serve"}]
            data += [{"id": f"emo-demo:{p}", "object": "model", "created": 1, "owned_by": "emo-serve",
                      "parent": "emo-demo"} for p in PROFILES]
            return {"object": "list", "data": data}

        @app.get("/v1/profiles")
        async def profiles():
            return {"object": "list", "data": list(PROFILES.values())}

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            return await state.answer(request, body, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            return await state.answer(request, body, chat=True)

        return app

    def count(self, key: str) -> int:
        with self.lock:
            self.attempts[key] += 1
            return self.attempts[key]

    async def answer(self, request: Request, body: dict, chat: bool):
        with self.lock:
            self.requests.append({"body": body, "headers": dict(request.headers)})
        prompt = body["messages"][-1]["content"] if chat else body.get("prompt")
        key = prompt if isinstance(prompt, str) else json.dumps(prompt)
        n = self.count(key)
        model = body.get("model") or "emo-demo"
        profile = body.get("profile") or (model.split(":", 1)[1] if ":" in model else "full")

        # -- scenarios, chosen by the prompt
        if key.startswith("flaky429:"):  # 429 the first N times, Retry-After: 0
            if n <= int(key.split(":")[1]):
                return _error(429, f"queue is full (attempt {n})", "rate_limit_error",
                              code="queue_full", headers={"Retry-After": "0"})
        elif key.startswith("flaky503:"):  # 503 the first N times, no Retry-After
            if n <= int(key.split(":")[1]):
                return _error(503, f"engine busy (attempt {n})", "service_unavailable", code="queue_full")
        elif key == "retry-after-1":
            if n == 1:
                return _error(429, "slow down", "rate_limit_error", headers={"Retry-After": "1"})
        elif key == "busy":
            return _error(503, "queue is full: 64 requests waiting (max_queue=64)", "service_unavailable",
                          code="queue_full")
        elif key == "bad":
            return _error(400, "temperature must be >= 0, got -1.0", "invalid_request_error", param="temperature")
        elif key == "too-long":
            return _error(413, "prompt has 5000 tokens, over the context of 4096", "invalid_request_error",
                          param="prompt", code="context_length_exceeded")
        elif key == "boom":
            return _error(500, "internal failure", "server_error")
        elif key == "not-json-error":
            return PlainTextResponse("upstream connect error", status_code=502)
        elif key == "slow":
            await asyncio.sleep(1.5)
        if profile not in PROFILES and profile not in ("full", "auto"):
            return _error(404, f"profile '{profile}' is not loaded; loaded: {', '.join(PROFILES)}",
                          "not_found_error", param="profile", code="profile_not_found")

        if body.get("stream"):
            return StreamingResponse(self.events(key, model, profile, chat), media_type="text/event-stream")
        text = f"echo:{key}|profile={profile}|model={model}"
        choices = []
        for i in range(int(body.get("n") or 1)):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop"})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": "length"})
        return {
            "id": "cmpl-standin", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "profile": profile, "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10},
            "system_fingerprint": "standin",
        }

    async def events(self, key: str, model: str, profile: str, chat: bool):
        sep = "\n" if key == "compact-sse" else "\n\n"
        for i, piece in enumerate(STREAM_PIECES):
            last = i == len(STREAM_PIECES) - 1
            if chat:
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": "stop" if last else None}
            else:
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": "length" if last else None}
            chunk = {"id": "cmpl-standin", "object": "text_completion", "created": 1, "model": model,
                     "profile": profile, "choices": [choice]}
            if i == 0:
                yield ": keep-alive comment\n\n"
            yield f"data: {json.dumps(chunk)}{sep}"
            if key == "stream-error" and i == 1:
                err = {"error": {"message": "engine stopped: out of memory", "type": "server_error",
                                 "param": None, "code": "engine_error"}}
                yield f"data: {json.dumps(err)}{sep}"
                return
            await asyncio.sleep(0.01)
        usage = {"id": "cmpl-standin", "object": "text_completion", "created": 1, "model": model,
                 "profile": profile, "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
        yield f"data: {json.dumps(usage)}{sep}"
        yield f"data: [DONE]{sep}"


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class _Running:
    def __init__(self, app: FastAPI, sock: socket.socket | None = None, delay: float = 0.0) -> None:
        self.sock = sock or _free_socket()
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.delay = delay
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.server.run(sockets=[self.sock])

    def start(self, wait: bool = True) -> "_Running":
        self.thread.start()
        if wait:
            deadline = time.time() + 10
            while not self.server.started:
                if time.time() > deadline:
                    raise RuntimeError("stand-in server did not start")
                time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def standin():
    s = StandIn()
    running = _Running(s.app).start()
    s.url = running.url
    yield s
    running.stop()


@pytest.fixture
def client(standin):
    with Client(standin.url, api_key=API_KEY, backoff_base=0.01, backoff_max=0.05) as c:
        yield c


def _attempts(standin: StandIn, key: str) -> int:
    with standin.lock:
        return standin.attempts[key]


# -- pure helpers -----------------------------------------------------------------


def test_normalize_base_url():
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_base_url("http://h:8000/") == "http://h:8000"
    assert normalize_base_url("h:8000") == "http://h:8000"


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == pytest.approx(5.0)


def test_sse_decoder_follows_the_spec_and_tolerates_compact_streams():
    d = SSEDecoder()
    out = []
    for line in [": comment", "data: {\"a\":", "data: 1}", "", "event: x", "data: [DONE]", ""]:
        out += d.feed(line)
    assert out == ['{"a":\n1}', "[DONE]"]
    d = SSEDecoder()
    out = []
    for line in ['data: {"a": 1}', 'data: {"a": 2}', "data: [DONE]"]:
        out += d.feed(line)
    out += d.flush()
    assert out == ['{"a": 1}', '{"a": 2}', "[DONE]"]


def test_backoff_grows_with_jitter_and_honours_cap():
    c = Client("http://127.0.0.1:1", backoff_base=1.0, backoff_max=4.0)
    try:
        for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)]:
            delays = [c.retry_delay(attempt) for _ in range(50)]
            assert all(cap / 2 <= d <= cap for d in delays)
            assert len(set(delays)) > 1  # jittered
    finally:
        c.close()


# -- the basics ---------------------------------------------------------------------


def test_health_models_profiles_metrics(client):
    h = client.health()
    assert h.ok and h.status == "ok" and h.model_extra["model"] == "emo-demo"
    models = client.models()
    assert [m.id for m in models] == ["emo-demo", "emo-demo:python", "emo-demo:prose"]
    assert models[1].base == "emo-demo" and models[1].profile == "python" and models[0].profile is None
    profiles = client.profiles()
    assert [p.name for p in profiles] == ["python", "prose"]
    py, pr = profiles
    assert py.expert_bytes == 1_048_576 and py.total_bytes == 1_548_576 and py.resident is True
    assert py.experts_per_layer == {"0": 4, "1": 4} and py.total_experts == 8
    assert py.average_coverage == 0.895 and py.model_extra["has_centroid"] is True
    assert pr.expert_bytes == pr.total_bytes == 2_097_152 and pr.total_experts == 8
    assert pr.average_coverage == 0.8 and pr.resident is False
    assert "emo_queue_depth" in client.metrics()


def test_complete_sends_profile_sampling_and_key(standin, client):
    out = client.complete("hello", profile="python", max_tokens=8, temperature=0.0, top_k=5,
                          stop=["\n"], seed=7, top_p=None)
    assert isinstance(out, Completion)
    assert out.profile == "python" and out.text == "echo:hello|profile=python|model=emo-demo"
    assert out.usage.total_tokens == 10 and out.choices[0].finish_reason == "length"
    assert out.model_extra["system_fingerprint"] == "standin"
    sent = standin.requests[-1]
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"
    assert sent["headers"]["user-agent"].startswith("emo-client/")
    # the base model was discovered from /v1/models; None values are left out
    assert sent["body"] == {"model": "emo-demo", "prompt": "hello", "profile": "python", "max_tokens": 8,
                            "temperature": 0.0, "top_k": 5, "stop": ["\n"], "seed": 7}


def test_a_profile_per_call(standin, client):
    a = client.complete("same prompt", profile="python")
    b = client.complete("same prompt", profile="prose")
    c = client.complete("same prompt")
    assert (a.profile, b.profile, c.profile) == ("python", "prose", "full")
    assert "profile" not in standin.requests[-1]["body"]


def test_profile_in_model_for_routers(standin):
    with Client(standin.url + "/v1", api_key=API_KEY, model="emo-demo", profile_in_model=True) as c:
        out = c.complete("routed", profile="prose")
    assert out.profile == "prose"
    body = standin.requests[-1]["body"]
    assert body["model"] == "emo-demo:prose" and "profile" not in body


def test_prompt_as_token_ids_and_n(client):
    out = client.complete([1, 2, 3], profile="python", n=2)
    assert len(out.choices) == 2 and out.choices[1].index == 1


def test_streaming_yields_text_deltas(client):
    stream = client.complete("stream me", profile="python", stream=True, max_tokens=5)
    deltas = list(stream)
    assert deltas == STREAM_PIECES
    assert stream.text == "".join(STREAM_PIECES)
    assert stream.profile == "python" and stream.finish_reason == "length"
    assert stream.usage is not None and stream.usage.completion_tokens == 5
    with pytest.raises(RuntimeError):
        list(stream)


def test_streaming_chunks_and_compact_sse(client):
    with client.stream("compact-sse", profile="prose") as stream:
        chunks = list(stream.iter_chunks())
    assert [c.text for c in chunks if c.choices] == STREAM_PIECES
    assert stream.profile == "prose"


def test_streaming_error_event_raises_with_message(client):
    stream = client.complete("stream-error", profile="python", stream=True)
    got = []
    with pytest.raises(StreamError) as info:
        for delta in stream:
            got.append(delta)
    assert got == STREAM_PIECES[:2]
    assert info.value.message == "engine stopped: out of memory" and info.value.code == "engine_error"


def test_chat(client):
    out = client.chat([{"role": "user", "content": "hi"}], profile="prose")
    assert out.text == "echo:hi|profile=prose|model=emo-demo" and out.profile == "prose"
    stream = client.chat([{"role": "user", "content": "hi stream"}], profile="prose", stream=True)
    assert "".join(stream) == "".join(STREAM_PIECES) and stream.finish_reason == "stop"


# -- errors carry the server's message ----------------------------------------------


@pytest.mark.parametrize(
    "prompt,profile,cls,status,message,param",
    [
        ("bad", "python", BadRequestError, 400, "temperature must be >= 0, got -1.0", "temperature"),
        ("too-long", "python", RequestTooLargeError, 413, "prompt has 5000 tokens, over the context of 4096",
         "prompt"),
        ("x", "klingon", NotFoundError, 404, "profile 'klingon' is not loaded; loaded: python, prose", "profile"),
        ("boom", "python", InternalServerError, 500, "internal failure", None),
    ],
)
def test_errors_surface_the_server_message(standin, client, prompt, profile, cls, status, message, param):
    before = _attempts(standin, prompt)
    with pytest.raises(cls) as info:
        client.complete(prompt, profile=profile)
    err = info.value
    assert isinstance(err, EmoError)
    assert (err.status, err.message, err.param) == (status, message, param)
    assert message in str(err) and str(status) in str(err)
    assert _attempts(standin, prompt) == before + 1  # never retried


def test_error_body_that_is_not_json(client):
    with pytest.raises(InternalServerError) as info:
        client.complete("not-json-error", profile="python")
    assert info.value.status == 502 and info.value.message == "upstream connect error"


def test_missing_api_key_is_401_with_message(standin):
    with Client(standin.url, api_key="", model="emo-demo") as c:
        with pytest.raises(AuthenticationError) as info:
            c.complete("hello")
    assert info.value.message == "Invalid or missing API key." and info.value.code == "invalid_api_key"


def test_errors_before_a_stream_starts_are_raised_by_the_call(client):
    with pytest.raises(NotFoundError):
        client.complete("x", profile="klingon", stream=True)


# -- retries: 429 and 503 only, with backoff ------------------------------------------


def test_retry_on_429_then_success(standin, client):
    out = client.complete("flaky429:2", profile="python")
    assert out.text.startswith("echo:flaky429:2") and _attempts(standin, "flaky429:2") == 3


def test_retry_on_503_backs_off(standin):
    with Client(standin.url, api_key=API_KEY, max_retries=2, backoff_base=0.2, backoff_max=5) as c:
        t0 = time.monotonic()
        out = c.complete("flaky503:2", profile="python")
        elapsed = time.monotonic() - t0
    assert out.profile == "python" and _attempts(standin, "flaky503:2") == 3
    assert elapsed >= 0.1 + 0.2  # equal jitter: at least half of 0.2, then half of 0.4


def test_retry_after_header_is_honoured(standin):
    with Client(standin.url, api_key=API_KEY, backoff_base=0.001) as c:
        t0 = time.monotonic()
        c.complete("retry-after-1", profile="python")
        assert time.monotonic() - t0 >= 0.95
    assert _attempts(standin, "retry-after-1") == 2


def test_retries_exhausted_raise_the_last_error(standin):
    with Client(standin.url, api_key=API_KEY, max_retries=3, backoff_base=0.01) as c:
        with pytest.raises(ServiceUnavailableError) as info:
            c.complete("busy", profile="python")
    assert info.value.message == "queue is full: 64 requests waiting (max_queue=64)"
    assert info.value.code == "queue_full" and _attempts(standin, "busy") == 4


def test_no_retries_when_disabled(standin):
    with Client(standin.url, api_key=API_KEY, max_retries=0) as c:
        with pytest.raises(RateLimitError) as info:
            c.complete("flaky429:1", profile="python")
    assert info.value.message == "queue is full (attempt 1)" and info.value.headers["retry-after"] == "0"
    assert _attempts(standin, "flaky429:1") == 1


def test_streaming_request_is_retried_before_it_starts(standin, client):
    stream = client.complete("flaky429:1:stream", profile="python", stream=True)
    assert "".join(stream) == "".join(STREAM_PIECES)
    assert _attempts(standin, "flaky429:1:stream") == 2


def test_read_timeout_is_not_retried(standin):
    with Client(standin.url, api_key=API_KEY, timeout=httpx.Timeout(0.3, connect=2.0), max_retries=3) as c:
        with pytest.raises(APITimeoutError):
            c.complete("slow", profile="python")
    assert _attempts(standin, "slow") == 1


def test_connection_refused_is_retried_until_the_server_comes_up():
    s = StandIn()
    # the socket is bound but not listening until the thread runs: connections are refused
    late = _Running(s.app, delay=0.6)
    t0 = time.monotonic()  # before the thread starts its 0.6 s delay, however late this process is scheduled
    late.start(wait=False)
    try:
        with Client(late.url, api_key=API_KEY, max_retries=8, backoff_base=0.1, backoff_max=0.4) as c:
            assert c.health().ok
            assert time.monotonic() - t0 >= 0.6  # it got in only after being refused
    finally:
        late.stop()


def test_connection_refused_raises_after_retries():
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    with Client(f"http://127.0.0.1:{port}", max_retries=2, backoff_base=0.01) as c:
        with pytest.raises(APIConnectionError) as info:
            c.health()
    assert info.value.status is None and f"127.0.0.1:{port}" in str(info.value)


# -- async --------------------------------------------------------------------------


def test_async_client(standin):
    async def main():
        async with AsyncClient(standin.url, api_key=API_KEY, backoff_base=0.01) as c:
            assert (await c.health()).ok
            assert [p.name for p in await c.profiles()] == ["python", "prose"]
            assert len(await c.models()) == 3
            a, b = await asyncio.gather(c.complete("async", profile="python"),
                                        c.complete("async", profile="prose"))
            assert (a.profile, b.profile) == ("python", "prose")
            stream = await c.complete("astream", profile="prose", stream=True)
            deltas = [d async for d in stream]
            assert deltas == STREAM_PIECES and stream.profile == "prose" and stream.finish_reason == "length"
            with pytest.raises(NotFoundError) as info:
                await c.complete("x", profile="klingon")
            assert "klingon" in info.value.message
            chat = await c.chat([{"role": "user", "content": "hey"}], profile="python")
            assert chat.text.startswith("echo:hey")
        return True

    assert asyncio.run(main())


def test_async_retry_on_429_and_503(standin):
    async def main():
        async with AsyncClient(standin.url, api_key=API_KEY, backoff_base=0.01, model="emo-demo") as c:
            a = await c.complete("flaky429:2:async", profile="prose")
            b = await c.complete("flaky503:1:async", profile="python")
            return a, b

    a, b = asyncio.run(main())
    assert (a.profile, b.profile) == ("prose", "python")
    assert _attempts(standin, "flaky429:2:async") == 3 and _attempts(standin, "flaky503:1:async") == 2


def test_async_streaming_error_event(standin):
    async def main():
        async with AsyncClient(standin.url, api_key=API_KEY, model="emo-demo") as c:
            stream = await c.complete("stream-error", profile="python", stream=True)
            got = []
            with pytest.raises(StreamError):
                async for d in stream:
                    got.append(d)
            return got

    assert asyncio.run(main()) == STREAM_PIECES[:2]


# -- the command --------------------------------------------------------------------


def test_cli_complete_profiles_models(standin, capsys):
    base = ["--base-url", standin.url, "--api-key", API_KEY]
    assert cli.main(base + ["complete", "cli prompt", "--profile", "python", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == "echo:cli prompt|profile=python|model=emo-demo\n"
    assert standin.requests[-1]["body"]["max_tokens"] == 4

    # global options after the sub-command work too
    assert cli.main(["complete", "s", "--profile", "prose", "--stream", "-v"] + base) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(STREAM_PIECES) + "\n" and "profile=prose" in captured.err

    assert cli.main(base + ["complete", "j", "--profile", "prose", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "prose"

    assert cli.main(base + ["profiles"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "EXPERTS/LAYER", "EXPERT", "BYTES", "COVERAGE", "RESIDENT"]
    assert out[1].split() == ["python", "4x2", "1.0", "MiB", "0.895", "yes"]
    assert out[2].split() == ["prose", "4x2", "2.0", "MiB", "0.800", "no"]

    assert cli.main(base + ["models"]) == 0
    assert capsys.readouterr().out.split() == ["emo-demo", "emo-demo:python", "emo-demo:prose"]
    assert cli.main(base + ["health"]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_cli_reads_stdin_and_key_from_env(standin, capsys, monkeypatch):
    monkeypatch.setenv("EMO_API_KEY", API_KEY)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("from stdin"))
    assert cli.main(["--base-url", standin.url, "complete", "--profile", "python"]) == 0
    assert capsys.readouterr().out.startswith("echo:from stdin|profile=python")


def test_cli_error_prints_server_message_and_fails(standin, capsys):
    code = cli.main(["--base-url", standin.url, "--api-key", API_KEY, "complete", "x", "--profile", "klingon"])
    err = capsys.readouterr().err
    assert code == 1 and "profile 'klingon' is not loaded" in err and "404" in err
    code = cli.main(["--base-url", standin.url, "--api-key", "wrong", "models"])
    assert code == 1 and "Invalid or missing API key." in capsys.readouterr().err


def test_console_script(standin):
    script = Path(sys.executable).parent / "emo-client"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "clients.cli"]
    done = subprocess.run(cmd + ["--base-url", standin.url, "--api-key", API_KEY, "models"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "emo-demo:python" in done.stdout.split()
    done = subprocess.run(cmd + ["--base-url", standin.url, "complete", "x"],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "Invalid or missing API key." in done.stderr
