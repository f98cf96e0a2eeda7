"""What completions and chat completions share: the input processor (body
parsing, validation of the limits, turning a request into engine `Sequence`s)
and reading their events back on the asyncio side through the output processor
(`modeling.output_processor`: detokenization and stop strings), with cancellation
on disconnect and a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from modeling import SamplingParams
from modeling.output_processor import SeqOutput
from modeling.sampling import seed_for_choice

from ... import metrics as M
from ...engine import EngineStopped, QueueFull, SeqEvent, Sequence, TokenInfo
from ...errors import APIError, bad_request
from ...state import AppState
from .completions.protocol import Usage

log = logging.getLogger("emo_serve")

T = TypeVar("T", bound=BaseModel)


# -- parsing -----------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # our schemas nest a few levels; anything deeper is not a request to us
MAX_INT_DIGITS = 40  # 2**128 has 39 digits; a longer integer is no value any field takes


class _BadJSON(ValueError):
    pass


def _parse_int(s: str) -> int:
    if len(s) > MAX_INT_DIGITS + (s[0] == "-"):
        raise _BadJSON(f"an integer of {len(s)} digits is larger than any field takes")
    return int(s)


def _parse_constant(name: str) -> float:
    raise _BadJSON(f"{name} is not a JSON number")


def check_json_value(obj: Any) -> None:
    """Nesting depth and text of a parsed body: a string must be encodable as
    UTF-8 (JSON's \\uD800 escapes give lone surrogates, which no tokenizer takes)."""
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body nests more than {MAX_JSON_DEPTH} levels deep", None, "too_deep")
        if isinstance(v, dict):
            for k, x in v.items():
                _check_text(k, path or "body")
                stack.append((x, depth + 1, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, str):
            _check_text(v, path)


def _check_text(v: str, path: str) -> None:
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            param = path.split("[")[0].split(".")[0] or None
            raise bad_request(f"{path or 'body'}: the text holds a lone surrogate (U+{ord(v[e.start]):04X}) at "
                              f"character {e.start}: not valid Unicode", param, "invalid_unicode") from None


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})", None, "invalid_utf8") from None
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                          None, "invalid_json") from None
    except RecursionError:
        raise bad_request(f"the request body nests more than {MAX_JSON_DEPTH} levels deep", None,
                          "too_deep") from None
    except ValueError as e:  # _BadJSON, and Python's own limit on integer digits
        raise bad_request(f"the request body is not valid here: {e}", None, "invalid_json") from None
    check_json_value(obj)
    return obj


async def parse_body(request: Request, schema: type[T]) -> T:
    """The JSON body as `schema`, or a 400 that names what is wrong."""
    raw = await request.body()
    obj = parse_json(raw) if len(raw) < 65536 else await asyncio.to_thread(parse_json, raw)
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, not a JSON {type(obj).__name__}",
                          None, "invalid_body")
    try:
        req = schema.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
    bad = req.unsupported_fields() if hasattr(req, "unsupported_fields") else []
    if bad:
        raise bad_request(f"{bad[0]}: not supported by this server (only its default is accepted)", bad[0],
                          "unsupported_parameter")
    return req


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

def check_text_fits(state: AppState, texts: list[str], param: str = "prompt") -> None:
    """Refuse a text that cannot fit the context before tokenizing it: tokenizing
    megabytes costs seconds and hundreds of MB, to answer 400 afterwards anyway."""
    tok = state.registry.model.tokenizer
    L = state.engine.max_model_len
    for t in texts:
        if len(t) > 4096 and (n := tok.min_tokens(t)) >= L:
            raise bad_request(f"{param}: {len(t)} characters are at least {n} tokens, more than the context length "
                              f"{L} (refused before tokenizing)", param, "context_length_exceeded")


MAX_STOP_TOKEN_IDS = 1024  # as many as logit_bias entries

def check_prompts(state: AppState, prompts: list[list[int]], max_tokens: int | None, n: int,
                  logprobs: int | None, default_max_tokens: int = 16, prompt_logprobs: bool = False,
                  logprobs_param: str = "logprobs") -> int:
    """Validate sizes against the server's limits; returns the max_tokens to use.
    `logprobs_param`: the field that asked for `logprobs` (chat: top_logprobs)."""
    cfg = state.config
    L = state.engine.max_model_len
    if n > cfg.max_n:
        raise bad_request(f"n: {n} is more than this server allows ({cfg.max_n})", "n", "n_too_large")
    if logprobs is not None and logprobs > cfg.max_logprobs:
        raise bad_request(f"{logprobs_param}: {logprobs} is more than this server allows ({cfg.max_logprobs})",
                          logprobs_param, "logprobs_too_large")
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
    if logprobs is not None:
        # the response holds (1 + logprobs) values per token that gets logprobs: bound it
        tokens = sum(n * (max_tokens + (len(p) if prompt_logprobs else 0)) for p in prompts)
        work = tokens * (1 + logprobs)
        if work > cfg.max_request_logprobs:
            raise bad_request(f"logprobs: this request asks for {work} logprob values ({len(prompts)} prompt(s) x "
                              f"n={n} x {tokens // max(1, len(prompts) * n)} tokens x (1 + logprobs={logprobs})); this "
                              f"server answers at most {cfg.max_request_logprobs} per request (--max-request-logprobs)"
                              "; send fewer prompts or tokens per request", "logprobs", "request_too_large")
    return max_tokens


def sampling_params(req, max_tokens: int, seed_offset: int, stop: list[str], cfg, vocab_size: int,
                    constraint=None) -> SamplingParams:
    if len(stop) > cfg.max_stop:
        raise bad_request(f"stop: {len(stop)} stop strings, at most {cfg.max_stop}", "stop", "too_many_stops")
    if any(len(s) > 256 for s in stop):
        raise bad_request("stop: a stop string is longer than 256 characters", "stop", "stop_too_long")
    if req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens: {req.min_tokens} is more than max_tokens ({max_tokens})", "min_tokens",
                          "min_tokens_too_large")
    if len(req.logit_bias or {}) > 1024:  # counted as sent: every key is parsed below
        raise bad_request(f"logit_bias: {len(req.logit_bias)} entries, at most 1024", "logit_bias",
                          "too_many_logit_bias")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"stop_token_ids: {len(stop_ids)} ids, at most {MAX_STOP_TOKEN_IDS}", "stop_token_ids",
                          "too_many_stop_token_ids")
    bad = next((t for t in stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"stop_token_ids: {str(bad)[:40]} is not a token id of this model (0..{vocab_size - 1})",
                          "stop_token_ids", "invalid_token_id")
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        if not (k.isascii() and k.isdigit() and len(k) <= 12 and int(k) < vocab_size):
            raise bad_request(f"logit_bias: key {k[:40]!r} is not a token id of this model (0..{vocab_size - 1})",
                              "logit_bias", "invalid_token_id")
        bias[int(k)] = float(v)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            top_k=0 if req.top_k is None else int(req.top_k),
            seed=None if req.seed is None else seed_for_choice(int(req.seed), seed_offset),
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens,
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            logit_bias=bias,
            skip_special_tokens=req.skip_special_tokens,
            constraint=constraint,
        )
    except ValueError as e:  # the schema should have caught it: still the client's value
        raise bad_request(str(e)) from None


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
