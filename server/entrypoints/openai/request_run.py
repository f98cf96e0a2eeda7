"""A request's sequences on the asyncio side (`Run`): submitted to the engine,
their events read back through the output processor (`modeling.output_processor`:
detokenization and stop strings), with cancellation on disconnect and a
deadline; server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request

from modeling import SamplingParams
from modeling.output_processor import SeqOutput

from ... import metrics as M
from ...engine import EngineStopped, QueueFull, SeqEvent, Sequence, TokenInfo
from ...errors import APIError
from ...state import AppState
from .completions.protocol import Usage

log = logging.getLogger("emo_serve")


# -- running -----------------------------------------------------------------------

@dataclass
class SeqResult:
    profile: str | None = None
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None


CLIENT_CHECK_S = 0.5  # how often a waiting request asks whether its client is still connected


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (its work is cancelled)."""


class Run:
    """The sequences of one request and the queue their events come back on.

    The deadline (`--request-timeout`) is enforced here as well as in the
    engine, and a dead engine fails the wait with 503: whatever happens on the
    engine thread, a request never waits forever."""

    def __init__(self, state: AppState, request: Request | None, profile: str,
                 specs: list[tuple[list[int], SamplingParams]], logprobs: int | None, prompt_logprobs: bool,
                 return_routing: bool = False):
        self.state = state
        self.started = time.monotonic()
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.requested_profile = profile
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SeqEvent]] = asyncio.Queue()
        timeout = state.config.request_timeout
        self.deadline = self.started + timeout if timeout else None
        self.seqs: list[Sequence] = []
        for i, (ids, params) in enumerate(specs):
            def sink(ev: SeqEvent, i: int = i) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            self.seqs.append(Sequence(ids, params, profile, sink, logprobs, prompt_logprobs, self.deadline,
                                      return_routing=return_routing))
        self.results = [SeqResult() for _ in self.seqs]
        tokenizer = state.registry.model.tokenizer
        self.outputs = [SeqOutput(params, tokenizer) for _, params in specs]
        self.done = [False] * len(self.seqs)
        self.status = "ok"
        self._metrics_done = False
        self._client_checked = self.started  # when _next last asked whether the client is still there
        # read by the access log line (server.app.AccessLog) once the response is sent
        self.access: dict[str, Any] = {"profile": profile}
        if request is not None:
            request.state.access = self.access

    def submit(self) -> None:
        try:
            self.state.engine.submit(self.seqs)
        except QueueFull as e:
            self.status = "429"
            self._record()
            raise APIError(429, f"{e}; retry later", "rate_limit_error", None, "queue_full") from None
        except EngineStopped as e:
            self.status = "503"
            self._record()
            raise APIError(503, str(e), "unavailable", None, "engine_unavailable") from None

    def cancel(self) -> None:
        for s, d in zip(self.seqs, self.done):
            if not d:
                s.cancel()
        self.state.engine.wake()

    @property
    def profile(self) -> str:
        names = [r.profile for r in self.results if r.profile]
        return names[0] if names else self.requested_profile

    def _fail(self, status: int, etype: str, msg: str) -> APIError:
        self.status = str(status)
        self.cancel()
        return APIError(status, msg, etype, None, etype)

    async def _next(self, request: Request | None) -> tuple[int, SeqEvent]:
        """The next event; meanwhile, every half second: client still there,
        engine still alive, deadline not passed. The client check runs on the
        clock, not only when the queue is idle: a request whose tokens keep
        coming (a long non-streaming answer) must notice a client that left."""
        while True:
            wait = 0.5
            if self.deadline is not None:
                wait = max(0.0, min(wait, self.deadline - time.monotonic()))
            # an event already queued is taken as is: `wait_for(get(), 0)` past the deadline
            # cancels the get before it runs, so it would never drain a queue that has events
            ev = None
            if not self.queue.empty():
                ev = self.queue.get_nowait()
            elif wait > 0:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
            now = time.monotonic()
            if request is not None and now - self._client_checked >= CLIENT_CHECK_S:
                self._client_checked = now
                if await request.is_disconnected():
                    self.status = "cancelled"
                    self.cancel()
                    raise ClientDisconnected()
            if ev is not None:
                return ev
            if not self.queue.empty():
                continue
            if not self.state.engine.thread.is_alive() or self.state.engine.failure is not None:
                raise self._fail(503, "unavailable", "the engine stopped (internal error); the server needs a restart")
            if self.deadline is not None and time.monotonic() >= self.deadline:
                # the engine checks deadlines between steps; this covers a step that never ends
                raise self._fail(504, "timeout", "the request ran past its time limit")

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, SeqEvent]]:
        """Events until every sequence finished; raises APIError on an engine error
        and ClientDisconnected (after cancelling) when the client goes away."""
        while not all(self.done):
            i, ev = await self._next(request)
            if self.done[i]:  # sent before the engine saw that a stop string had ended the sequence
                continue
            r = self.results[i]
            if ev.error is not None:
                self.done[i] = True
                status, etype, msg = ev.error
                raise self._fail(status, etype, msg)
            if self.outputs[i].process(ev):  # a stop string ended it: the engine drops it before its next step
                self.seqs[i].cancel()
                self.state.engine.wake()
            if ev.tokens:
                M.GENERATED_TOKENS.inc(len(ev.tokens))
            if ev.profile:
                r.profile = ev.profile
            if ev.prompt_logprobs is not None:
                r.prompt_logprobs = ev.prompt_logprobs
            if ev.tokens and r.first_token_at is None:
                r.first_token_at = time.monotonic()
                M.TTFT.labels(r.profile or self.requested_profile).observe(r.first_token_at - self.started)
            r.tokens += ev.tokens
            r.text += ev.text
            if ev.finish_reason:
                r.finish_reason = ev.finish_reason
                self.done[i] = True
            yield i, ev

    async def collect(self, request: Request | None = None) -> None:
        """Wait until every sequence finished (see `results`); errors propagate."""
        try:
            async for _ in self.events(request):
                pass
        finally:
            self.finish_metrics()

    async def sse_stream(self, request: Request, render: Callable[[int, SeqEvent], str | None],
                         usage_chunk: Callable[[], str] | None = None) -> AsyncIterator[str]:
        """Server-sent events: `render(i, event)` per event (None: nothing to send),
        then the usage chunk when asked and `[DONE]`. An engine error (shutdown
        included) is sent as its error object before `[DONE]`; a client that goes
        away (the generator is closed) cancels the remaining work."""
        try:
            async for i, ev in self.events(request):
                out = render(i, ev)
                if out is not None:
                    yield out
            self.finish_metrics()
            if usage_chunk is not None:
                yield usage_chunk()
            yield SSE_DONE
        except APIError as e:
            self.finish_metrics()
            yield sse(e.body())
            yield SSE_DONE
        except ClientDisconnected:
            log.info("client disconnected from a stream; its work is cancelled")
        finally:
            if not all(self.done):
                if self.status == "ok":
                    self.status = "cancelled"
                self.cancel()
            self.finish_metrics()

    def finish_metrics(self) -> None:
        if self._metrics_done:
            return
        self._metrics_done = True
        self._record()
        if self.status == "ok":
            M.LATENCY.labels(self.profile).observe(time.monotonic() - self.started)

    def routing(self, i: int) -> dict | None:
        """Sequence i's compact routing summary (`return_routing`), once it finished."""
        s = self.seqs[i]
        if not (s.return_routing and self.done[i]):
            return None
        return self.state.engine.routing_summary(self.outputs[i].expert_counts, s.prompt_affinity)

    def _record(self) -> None:
        M.REQUESTS.labels(self.profile, self.status).inc()
        self.access.update(profile=self.profile, prompt_tokens=sum(len(s.prompt_ids) for s in self.seqs),
                           completion_tokens=sum(len(r.tokens) for r in self.results), outcome=self.status)

    def usage(self, prompt_lens: list[int]) -> Usage:
        p = sum(prompt_lens)
        c = sum(len(r.tokens) for r in self.results)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
