"""The logic of POST /v1/chat/completions: the tokenizer's chat template renders
the messages into one prompt, then the same engine path as completions."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from modeling import TokenizerError

from ....engine import TokenInfo
from ....errors import APIError, bad_request
from ....state import AppState
from ..completions.protocol import dump
from ..serving_engine import Run, check_prompts, check_text_fits, parse_body, sampling_params, sse, stop_list
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChoiceLogprobs, DeltaMessage, TokenLogprob, TopLogprob)


def _logprob_content(state: AppState, tokens: list[TokenInfo], k: int | None) -> ChoiceLogprobs:
    tok = state.registry.model.tokenizer
    out = []
    for info in tokens:
        s = tok.token_text(info.token_id)
        top = [TopLogprob(token=(t_s := tok.token_text(t)), logprob=lp, bytes=list(t_s.encode()))
               for t, lp in (info.top or [])][: k or 0]
        out.append(TokenLogprob(token=s, logprob=info.logprob, bytes=list(s.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=out)


def render_prompt(state: AppState, req: ChatCompletionRequest, must_fit: bool = False) -> list[int]:
    """The chat template over the messages, tokenized (runs off the event loop).
    `must_fit`: refuse a text that cannot fit the context before tokenizing it."""
    tok = state.registry.model.tokenizer
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                       add_generation_prompt=req.add_generation_prompt)
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # a template error caused by the messages
        raise bad_request(f"messages: the chat template failed ({type(e).__name__}: {e})", "messages") from None
    if must_fit:
        check_text_fits(state, [text], "messages")
    return tok.encode(text)


async def create_chat_completion(request: Request) -> JSONResponse | StreamingResponse:
    state: AppState = request.app.state.emo
    req = await parse_body(request, ChatCompletionRequest)
    tok = state.registry.model.tokenizer
    if tok is None or tok.chat_template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       "invalid_request_error", None, "no_chat_template")
    profile = state.registry.select(req.model, req.profile)
    prompt = await asyncio.to_thread(render_prompt, state, req, True)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    k = req.top_logprobs if req.logprobs else None
    if req.logprobs and k is None:
        k = 0
    max_tokens = check_prompts(state, [prompt], max_tokens, req.n, k, default_max_tokens=state.engine.max_model_len,
                               logprobs_param="top_logprobs")
    stop = stop_list(req.stop)
    vocab = state.registry.model.config.vocab_size
    specs = [(prompt, sampling_params(req, max_tokens, j, stop, state.config, vocab)) for j in range(req.n)]
    run = Run(state, request, profile, specs, k, False, req.return_routing)
    run.submit()
    base = state.registry.base_name

    def model_id() -> str:
        return base if run.profile == "full" else f"{base}:{run.profile}"

    if req.stream:
        return StreamingResponse(_stream(run, req, request, len(prompt), model_id, k),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await run.collect(request)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=r.text),
                          logprobs=_logprob_content(state, r.tokens, k) if req.logprobs else None,
                          finish_reason=r.finish_reason, routing=run.routing(i) if req.return_routing else None)
               for i, r in enumerate(run.results)]
    body = ChatCompletionResponse(id=f"chatcmpl-{run.id}", created=run.created, model=model_id(),
                                  profile=run.profile, choices=choices, usage=run.usage([len(prompt)]))
    return JSONResponse(dump(body))


def _stream(run: Run, req: ChatCompletionRequest, request: Request, prompt_len: int, model_id,
            k) -> AsyncIterator[str]:
    state = run.state
    started = [False] * len(run.seqs)

    def chunk(choices: list[ChatChunkChoice], usage=None) -> str:
        obj = ChatCompletionChunk(id=f"chatcmpl-{run.id}", created=run.created, model=model_id(),
                                  profile=run.profile, choices=choices)
        if usage is not None:
            obj.usage = usage
        return sse(dump(obj, exclude_unset_fields=("usage",)))

    def render(i: int, ev) -> str | None:
        if not (ev.tokens or ev.finish_reason or ev.text):
            return None
        delta = DeltaMessage(content=ev.text)
        if not started[i]:
            started[i] = True
            delta.role = "assistant"
        lp = _logprob_content(state, ev.tokens, k) if req.logprobs else None
        routing = run.routing(i) if req.return_routing and ev.finish_reason else None
        return chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=ev.finish_reason,
                                      routing=routing)])

    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return run.sse_stream(request, render, (lambda: chunk([], run.usage([prompt_len]))) if include_usage else None)
