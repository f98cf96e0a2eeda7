"""The input processor (vLLM v1's first part), on the asyncio side: body
parsing, validation of the limits and of the sampling parameters, before a
request becomes engine `Sequence`s (`request_run.Run`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from modeling import SamplingParams
from modeling.sampling import seed_for_choice

from ...errors import APIError, bad_request
from ...state import AppState

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
