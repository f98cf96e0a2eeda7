"""The logic of POST /v1/chat/completions: the tokenizer's chat template renders
the messages (and the tools) into one prompt, then the same engine path as
completions; the output is split into reasoning, content and tool calls.

Tool calls: the format comes from the chat template (server.tool_parsers,
`--tool-call-parser` overrides). With `tool_choice` `required` or a named
function, decoding is constrained to calls of the given tools whose arguments
follow their parameter schemas; with `auto` the model chooses and its output
is parsed (a block that does not read as a call stays content)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from modeling import TokenizerError

from ....engine import TokenInfo
from ....errors import APIError, bad_request
from ....reasoning import ReasoningSplitter, enabled as reasoning_enabled
from ....state import AppState
from ....structured_outputs import checked, constraints, structured_grammar
from ....tool_parsers import HarmonyFormat, HarmonySplitter, ToolCall, ToolCallExtractor, ToolFormat, format_for
from ..completions.protocol import dump
from ..input_processor import check_prompts, check_text_fits, parse_body, sampling_params, stop_list
from ..request_run import Run, sse
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChoiceLogprobs, DeltaFunctionCall, DeltaMessage, DeltaToolCall,
                       FunctionCallOut, TokenLogprob, ToolCallOut, TopLogprob)


def _logprob_content(state: AppState, tokens: list[TokenInfo], k: int | None) -> ChoiceLogprobs:
    tok = state.registry.model.tokenizer
    out = []
    for info in tokens:
        s = tok.token_text(info.token_id)
        top = [TopLogprob(token=(t_s := tok.token_text(t)), logprob=lp, bytes=list(t_s.encode()))
               for t, lp in (info.top or [])][: k or 0]
        out.append(TokenLogprob(token=s, logprob=info.logprob, bytes=list(s.encode()), top_logprobs=top))
    return ChoiceLogprobs(content=out)


def _template_message(m) -> dict:
    """A message as chat templates read it (transformers' shape): a call's arguments as an object."""
    d: dict = {"role": m.role, "content": m.text()}
    for f in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, f) is not None:
            d[f] = getattr(m, f)
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        d["tool_calls"] = calls
    return d


@dataclass
class ToolPlan:
    """What a request's tools mean for this run."""

    tools: list[dict]  # {"name", "description", "parameters"} of every tool offered
    parse: bool  # split the output into calls (tool_choice other than none)
    grammar: str | None  # calls forced (required / named): the grammar that constrains decoding
    fmt: ToolFormat


def plan_tools(state: AppState, req: ChatCompletionRequest) -> ToolPlan:
    tok = state.registry.model.tokenizer
    fmt = format_for(tok.chat_template, state.config.tool_call_parser)
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise bad_request("tool_choice: no tools were given to choose from", "tool_choice")
    forced: list[dict] | None = None
    if choice == "required":
        forced = tools
    elif not isinstance(choice, str):
        forced = [t for t in tools if t["name"] == choice.function.name]
        if not forced:
            raise bad_request(f"tool_choice: no tool named {choice.function.name!r} in tools", "tool_choice")
    grammar = None
    if forced is not None:
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request("response_format: cannot be combined with tool_choice required or named",
                              "response_format")
        grammar = fmt.grammar(forced, parallel=choice == "required" and req.parallel_tool_calls is not False)
        if grammar is None:
            raise bad_request(f"tool_choice: this model's tool-call format ({fmt.name}) cannot be constrained here; "
                              "use tool_choice auto", "tool_choice")
    return ToolPlan(tools, choice != "none", grammar, fmt)


def render_prompt(state: AppState, req: ChatCompletionRequest, must_fit: bool = False) -> tuple[list[int], str]:
    """The chat template over the messages and tools, and its tokens (runs off the event loop).
    `must_fit`: refuse a text that cannot fit the context before tokenizing it."""
    tok = state.registry.model.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        text = tok.apply_chat_template([_template_message(m) for m in req.messages],
                                       add_generation_prompt=req.add_generation_prompt, tools=tools,
                                       **(req.chat_template_kwargs or {}))
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None
    except Exception as e:  # a template error caused by the messages
        raise bad_request(f"messages: the chat template failed ({type(e).__name__}: {e})", "messages") from None
    if must_fit:
        check_text_fits(state, [text], "messages")
    return tok.encode(text), text


class OutputSplitter:
    """One choice's output text as reasoning, content and tool calls, fed as it streams."""

    def __init__(self, state: AppState, tools: ToolPlan, prompt_text: str):
        tok = state.registry.model.tokenizer
        # gpt-oss's harmony: channels and recipients carry reasoning, content and calls together
        self.harmony = HarmonySplitter(tools.tools if tools.parse else []) if isinstance(tools.fmt, HarmonyFormat) \
            else None
        self.reasoning = (ReasoningSplitter(prompt_text)
                          if reasoning_enabled(tok.chat_template, state.config.reasoning_parser) else None)
        self.calls = ToolCallExtractor(tools.fmt, tools.tools) if tools.parse else None
        self.made: list[ToolCall] = []

    def _content(self, text: str, last: bool) -> tuple[str, list[ToolCall]]:
        if self.calls is None:
            return text, []
        c, k = self.calls.feed(text)
        if last:
            c2, k2 = self.calls.finish()
            c, k = c + c2, k + k2
        self.made += k
        return c, k

    def feed(self, delta: str, last: bool = False) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, completed calls) released by `delta`; `last`: the output ended."""
        if self.harmony is not None:
            reasoning, content, calls = self.harmony.feed(delta, last)
            self.made += calls
            return reasoning, content, calls
        reasoning, content = ("", delta) if self.reasoning is None else self.reasoning.feed(delta)
        if last and self.reasoning is not None:
            r2, c2 = self.reasoning.finish()
            reasoning, content = reasoning + r2, content + c2
        content, calls = self._content(content, last)
        return reasoning, content, calls

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.made else reason


async def start_chat(state: AppState, request: Request, req: ChatCompletionRequest,
                     k: int | None) -> tuple[Run, list[int], list[OutputSplitter]]:
    """Template, grammar, limits and the submitted run of a chat request (shared with /v1/responses)."""
    model = state.registry.model
    tok = model.tokenizer
    if tok is None or tok.chat_template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       "invalid_request_error", None, "no_chat_template")
    profile = state.registry.select(req.model, req.profile)
    tools = plan_tools(state, req)
    prompt, prompt_text = await asyncio.to_thread(render_prompt, state, req, True)
    grammar = (await asyncio.to_thread(checked, model, tools.grammar, "tool_choice") if tools.grammar is not None
               else await structured_grammar(model, req))
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = check_prompts(state, [prompt], max_tokens, req.n, k, default_max_tokens=state.engine.max_model_len,
                               logprobs_param="top_logprobs")
    stop = stop_list(req.stop)
    vocab = model.config.vocab_size
    grammars = await constraints(model, grammar, req.n)
    specs = [(prompt, sampling_params(req, max_tokens, j, stop, state.config, vocab, grammars[j]))
             for j in range(req.n)]
    if isinstance(tools.fmt, HarmonyFormat):  # its markers are special tokens: the splitter needs them
        for _, params in specs:
            params.skip_special_tokens = False
    run = Run(state, request, profile, specs, k, False, req.return_routing)
    run.submit()
    return run, prompt, [OutputSplitter(state, tools, prompt_text) for _ in specs]


async def create_chat_completion(request: Request) -> JSONResponse | StreamingResponse:
    state: AppState = request.app.state.emo
    req = await parse_body(request, ChatCompletionRequest)
    k = req.top_logprobs if req.logprobs else None
    if req.logprobs and k is None:
        k = 0
    run, prompt, splitters = await start_chat(state, request, req, k)
    base = state.registry.base_name

    def model_id() -> str:
        return base if run.profile == "full" else f"{base}:{run.profile}"

    if req.stream:
        return StreamingResponse(_stream(run, req, request, len(prompt), model_id, k, splitters),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await run.collect(request)
    choices = []
    for i, r in enumerate(run.results):
        sp = splitters[i]
        reasoning, content, calls = sp.feed(r.text, last=True)
        msg = AssistantMessage(content=content if content or not calls else None,
                               reasoning_content=reasoning or None,
                               tool_calls=[ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name,
                                                                                         arguments=c.arguments))
                                           for c in calls])
        choices.append(ChatChoice(index=i, message=msg,
                                  logprobs=_logprob_content(state, r.tokens, k) if req.logprobs else None,
                                  finish_reason=sp.finish_reason(r.finish_reason),
                                  routing=run.routing(i) if req.return_routing else None))
    body = ChatCompletionResponse(id=f"chatcmpl-{run.id}", created=run.created, model=model_id(),
                                  profile=run.profile, choices=choices, usage=run.usage([len(prompt)]))
    return JSONResponse(dump(body))


def _stream(run: Run, req: ChatCompletionRequest, request: Request, prompt_len: int, model_id,
            k, splitters: list[OutputSplitter]) -> AsyncIterator[str]:
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
        sp = splitters[i]
        first_call = len(sp.made)
        reasoning, content, calls = sp.feed(ev.text, last=ev.finish_reason is not None)
        if not (reasoning or content or calls or ev.finish_reason) and started[i] and not req.logprobs:
            return None  # text held back (a possible marker): nothing to say yet
        delta = DeltaMessage(content=content or None, reasoning_content=reasoning or None)
        if calls:
            delta.tool_calls = [DeltaToolCall(index=first_call + j, id=c.id, type="function",
                                              function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
                                for j, c in enumerate(calls)]
        if not started[i]:
            started[i] = True
            delta.role = "assistant"
            if delta.content is None and not calls and delta.reasoning_content is None:
                delta.content = ""
        lp = _logprob_content(state, ev.tokens, k) if req.logprobs else None
        routing = run.routing(i) if req.return_routing and ev.finish_reason else None
        return chunk([ChatChunkChoice(index=i, delta=delta, logprobs=lp,
                                      finish_reason=sp.finish_reason(ev.finish_reason), routing=routing)])

    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return run.sse_stream(request, render, (lambda: chunk([], run.usage([prompt_len]))) if include_usage else None)
