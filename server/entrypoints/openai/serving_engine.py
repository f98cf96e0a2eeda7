"""What completions and chat completions share: body parsing, validation of the
limits, turning a request into engine `Sequence`s, and reading their events back
on the asyncio side (with cancellation on disconnect and a deadline)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from modeling import SamplingParams

from ... import metrics as M
from ...engine import EngineStopped, QueueFull, SeqEvent, Sequence, TokenInfo
from ...errors import APIError, bad_request

T = TypeVar("T", bound=BaseModel)


# -- parsing -----------------------------------------------------------------------

async def parse_body(request: Request, schema: type[T]) -> T:
    """The JSON body as `schema`, or a 400 that names what is wrong."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})", None, "invalid_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          None, "invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not a JSON {type(obj).__name__}",
                          None, "invalid_body")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    errs = e.errors(include_url=False)
    first = errs[0] if errs else {"loc": (), "msg": str(e)}
    loc = [str(x) for x in first.get("loc", ()) if not str(x).startswith(("function-", "constrained-"))]
    # pydantic names union members in loc ("str", "list[int]", ...); keep the field path
    path = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
    param = ".".join(path) or None
    inp = first.get("input")
    shown = repr(inp)[:80] if inp is not None and not isinstance(inp, (dict, list)) else type(inp).__name__
    msg = f"{param or 'body'}: {first.get('msg', 'invalid value')} (got {shown})"
    if len(errs) > 1:
        msg += f"; and {len(errs) - 1} more error(s)"
    return APIError(400, msg, "invalid_request_error", param, "invalid_value")


# -- limits ------------------------------------------------------------------------

def check_prompts(state, prompts: list[list[int]], max_tokens: int | None, n: int,
                  logprobs: int | None, default_max_tokens: int = 16) -> int:
    """Validate sizes against the server's limits; returns the max_tokens to use."""
    cfg = state.config
    L = state.engine.max_model_len
    if n > cfg.max_n:
        raise bad_request(f"n: {n} is more than this server allows ({cfg.max_n})", "n", "n_too_large")
    if logprobs is not None and logprobs > cfg.max_logprobs:
        raise bad_request(f"logprobs: {logprobs} is more than this server allows ({cfg.max_logprobs})",
                          "logprobs", "logprobs_too_large")
    if max_tokens is not None and max_tokens > L:
        raise bad_request(f"max_tokens: {max_tokens} is more than the context length ({L})", "max_tokens",
                          "max_tokens_too_large")
    if len(prompts) * n > cfg.max_queue:
        raise bad_request(f"{len(prompts)} prompts x n={n} sequences is more than the queue holds ({cfg.max_queue})",
                          "n", "too_many_sequences")
    vocab = state.registry.model.config.vocab_size
    longest = 0
    for p in prompts:
        if not p:
            raise bad_request("prompt: a prompt is empty", "prompt", "empty_prompt")
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt",
                              "invalid_token_id")
        longest = max(longest, len(p))
    if longest >= L + (1 if max_tokens == 0 else 0):
        raise bad_request(f"prompt: {longest} tokens do not fit the context length {L} "
                          f"(with at least one token to generate)", "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, L - longest)
    if longest + max_tokens > L:
        raise bad_request(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) = {longest + max_tokens} is more "
                          f"than the context length {L}", "max_tokens", "context_length_exceeded")
    return max_tokens


def sampling_params(req, max_tokens: int, seed_offset: int, stop: list[str], cfg) -> SamplingParams:
    if len(stop) > cfg.max_stop:
        raise bad_request(f"stop: {len(stop)} stop strings, at most {cfg.max_stop}", "stop", "too_many_stops")
    if any(len(s) > 256 for s in stop):
        raise bad_request("stop: a stop string is longer than 256 characters", "stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=0 if req.top_k is None else int(req.top_k),
        seed=None if req.seed is None else int(req.seed) + seed_offset,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
    )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# -- running -----------------------------------------------------------------------

@dataclass
class SeqResult:
    profile: str | None = None
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[TokenInfo] | None = None
    finish_reason: str | None = None
    first_token_at: float | None = None


class Run:
    """The sequences of one request and the queue their events come back on."""

    def __init__(self, state, profile: str, specs: list[tuple[list[int], SamplingParams]], logprobs: int | None,
                 prompt_logprobs: bool, return_routing: bool = False):
        self.state = state
        self.started = time.monotonic()
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.requested_profile = profile
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SeqEvent]] = asyncio.Queue()
        deadline = self.started + state.config.request_timeout if state.config.request_timeout else None
        self.seqs: list[Sequence] = []
        for i, (ids, params) in enumerate(specs):
            def sink(ev: SeqEvent, i: int = i) -> None:
                loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev))
            self.seqs.append(Sequence(ids, params, profile, sink, logprobs, prompt_logprobs, deadline,
                                      return_routing=return_routing))
        self.results = [SeqResult() for _ in self.seqs]
        self.done = [False] * len(self.seqs)
        self.status = "ok"

    def submit(self) -> None:
        try:
            self.state.engine.submit(self.seqs)
        except QueueFull as e:
            self.status = "rejected"
            M.REQUESTS.labels(self.requested_profile, "429").inc()
            raise APIError(429, f"{e}; retry later", "rate_limit_error", None, "queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), "unavailable", None, "shutting_down") from None

    def cancel(self) -> None:
        for s, d in zip(self.seqs, self.done):
            if not d:
                s.cancel()
        self.state.engine.wake()

    @property
    def profile(self) -> str:
        names = [r.profile for r in self.results if r.profile]
        return names[0] if names else self.requested_profile

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, SeqEvent]]:
        """Events until every sequence finished; raises APIError on an engine error.
        Polls `request.is_disconnected()` while waiting (cancelling on disconnect)."""
        while not all(self.done):
            try:
                i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.status = "cancelled"
                    self.cancel()
                    raise asyncio.CancelledError()
                continue
            r = self.results[i]
            if ev.error is not None:
                self.done[i] = True
                status, etype, msg = ev.error
                self.status = str(status)
                self.cancel()
                raise APIError(status, msg, etype, None, etype)
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
        then the usage chunk when asked and `[DONE]`. An engine error is sent as
        its error object before `[DONE]`; a client that goes away (the generator
        is closed) cancels the remaining work."""
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
        finally:
            if not all(self.done):
                if self.status == "ok":
                    self.status = "cancelled"
                    self.finish_metrics()
                self.cancel()

    def finish_metrics(self) -> None:
        M.REQUESTS.labels(self.profile, self.status).inc()
        if self.status == "ok":
            M.LATENCY.labels(self.profile).observe(time.monotonic() - self.started)

    def routing(self, i: int) -> dict | None:
        """Sequence i's compact routing summary (`return_routing`), once it finished."""
        s = self.seqs[i]
        return self.state.engine.routing_summary(s) if s.return_routing and self.done[i] else None

    def usage(self, prompt_lens: list[int]) -> dict[str, int]:
        p = sum(prompt_lens)
        c = sum(len(r.tokens) for r in self.results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
