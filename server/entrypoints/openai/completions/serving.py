"""The logic of POST /v1/completions: prompts to sequences, events to OpenAI's
`text_completion` objects (whole, or streamed as server-sent events)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ....engine import TokenInfo
from ....errors import bad_request
from ....state import AppState
from ....structured_outputs import constraints, structured_grammar
from ..input_processor import check_prompts, check_text_fits, parse_body, sampling_params, stop_list
from ..request_run import Run, sse
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, dump


def tokenize_prompts(state: AppState, prompt) -> tuple[list[list[int]], bool]:
    """(token ids per prompt, whether the prompts were given as text)."""
    tok = state.registry.model.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and not prompt:
        raise bad_request("prompt: an empty list", "prompt", "empty_prompt")
    if isinstance(prompt[0], str):
        if tok is None:
            raise bad_request("prompt: this model has no tokenizer; send token ids", "prompt")
        check_text_fits(state, prompt)
        return [tok.encode(p) for p in prompt], True
    if isinstance(prompt[0], int):
        return [list(prompt)], False
    return [list(p) for p in prompt], False


class CompletionLogprobBuilder:
    """OpenAI's completions `logprobs` object, built token by token."""

    def __init__(self, state: AppState, offset: int = 0):
        self.tok = state.registry.model.tokenizer
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def _text(self, t: int) -> str:
        return self.tok.token_text(t) if self.tok is not None else str(t)

    def add(self, infos: list[TokenInfo]) -> CompletionLogprobs:
        start = len(self.tokens)
        for info in infos:
            s = self._text(info.token_id)
            self.tokens.append(s)
            self.token_logprobs.append(info.logprob)
            if info.top is None:
                self.top_logprobs.append(None if info.logprob is None else {s: info.logprob})
            else:
                top = {self._text(t): lp for t, lp in info.top}
                if info.logprob is not None:
                    top.setdefault(s, info.logprob)
                self.top_logprobs.append(top)
            self.text_offset.append(self.offset)
            self.offset += len(s)
        return self.since(start)

    def since(self, start: int) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=self.tokens[start:], token_logprobs=self.token_logprobs[start:],
                                  top_logprobs=self.top_logprobs[start:], text_offset=self.text_offset[start:])


async def create_completion(request: Request) -> JSONResponse | StreamingResponse:
    state: AppState = request.app.state.emo
    req = await parse_body(request, CompletionRequest)
    profile = state.registry.select(req.model, req.profile)
    # tokenizing a long prompt takes a while: never on the event loop
    prompts, as_text = await asyncio.to_thread(tokenize_prompts, state, req.prompt)
    want_prompt_lp = req.echo and req.logprobs is not None
    max_tokens = check_prompts(state, prompts, req.max_tokens, req.n, req.logprobs, prompt_logprobs=want_prompt_lp)
    stop = stop_list(req.stop)
    model = state.registry.model
    grammar = await structured_grammar(model, req)
    grammars = iter(await constraints(model, grammar, len(prompts) * req.n))
    specs = []
    for p in prompts:
        for j in range(req.n):
            specs.append((p, sampling_params(req, max_tokens, j, stop, state.config, model.config.vocab_size,
                                             next(grammars))))
    run = Run(state, request, profile, specs, req.logprobs, want_prompt_lp, req.return_routing)
    run.submit()
    tok = state.registry.model.tokenizer
    prompt_texts = ([""] * len(prompts) if not req.echo or tok is None
                    else await asyncio.to_thread(lambda: [tok.decode(p) for p in prompts]))
    seq_prompt = [k // req.n for k in range(len(specs))]
    model_name = state.registry.base_name

    def model_id() -> str:
        return model_name if run.profile == "full" else f"{model_name}:{run.profile}"

    if req.stream:
        return StreamingResponse(_stream(run, req, request, prompts, prompt_texts, seq_prompt, model_id),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await run.collect(request)
    choices = []
    for k, r in enumerate(run.results):
        text = r.text
        lp = None
        if req.logprobs is not None:
            b = CompletionLogprobBuilder(state)
            if req.echo and r.prompt_logprobs is not None:
                b.add(r.prompt_logprobs)
            b.add(r.tokens)
            lp = b.since(0)
        if req.echo:
            text = prompt_texts[seq_prompt[k]] + text
        choices.append(CompletionChoice(index=k, text=text, logprobs=lp, finish_reason=r.finish_reason,
                                        profile=r.profile, routing=run.routing(k) if req.return_routing else None))
    body = CompletionResponse(id=f"cmpl-{run.id}", created=run.created, model=model_id(), profile=run.profile,
                              choices=choices, usage=run.usage([len(p) for p in prompts]))
    return JSONResponse(dump(body))


def _stream(run: Run, req: CompletionRequest, request: Request, prompts, prompt_texts, seq_prompt,
            model_id) -> AsyncIterator[str]:
    state = run.state
    builders = [CompletionLogprobBuilder(state) for _ in run.seqs]
    echoed = [False] * len(run.seqs)

    def chunk(choices: list[CompletionChoice], usage=None) -> str:
        obj = CompletionResponse(id=f"cmpl-{run.id}", created=run.created, model=model_id(), profile=run.profile,
                                 choices=choices)
        if usage is not None:
            obj.usage = usage
        return sse(dump(obj, exclude_unset_fields=("usage",)))

    def render(k: int, ev) -> str | None:
        text, lp_parts = "", []
        if req.echo and not echoed[k] and (ev.tokens or ev.finish_reason or ev.prompt_logprobs is not None):
            echoed[k] = True
            text = prompt_texts[seq_prompt[k]]
            if ev.prompt_logprobs is not None and req.logprobs is not None:
                lp_parts.append(ev.prompt_logprobs)
        if not (ev.tokens or ev.finish_reason or text or ev.text):
            return None
        text += ev.text
        lp = None
        if req.logprobs is not None:
            b = builders[k]
            start = len(b.tokens)
            for part in lp_parts:
                b.add(part)
            b.add(ev.tokens)
            lp = b.since(start)
        routing = run.routing(k) if req.return_routing and ev.finish_reason else None
        return chunk([CompletionChoice(index=k, text=text, logprobs=lp, finish_reason=ev.finish_reason,
                                       routing=routing)])

    include_usage = req.stream_options is not None and req.stream_options.include_usage
    usage = (lambda: chunk([], run.usage([len(p) for p in prompts]))) if include_usage else None
    return run.sse_stream(request, render, usage)
