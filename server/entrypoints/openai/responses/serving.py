"""The logic of POST /v1/responses: the request becomes a chat request (the
instructions a system turn, function calls and their outputs assistant and
tool turns, `text.format` the response format), runs through the chat path
(template, tools, grammar, one engine sequence), and its output becomes
Response items: reasoning, a message, function calls. Streaming sends
OpenAI's typed events (`response.created` ... `response.completed`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ....errors import bad_request
from ....state import AppState
from ....tool_parsers import ToolCall
from ..chat.protocol import ChatCompletionRequest
from ..chat.serving import OutputSplitter, start_chat
from ..completions.protocol import dump
from ..input_processor import parse_body, validation_error
from ..request_run import Run
from .protocol import (FunctionCallItem, FunctionCallOutputItem, IncompleteDetails, MessageItem, OutputFunctionCall,
                       OutputMessage, OutputReasoning, OutputText, ReasoningText, ResponseObject, ResponsesRequest,
                       ResponseUsage)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request this Responses request means."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for it in items:
        if isinstance(it, MessageItem):
            messages.append({"role": it.role, "content": it.text()})
        elif isinstance(it, FunctionCallItem):
            call = {"id": it.call_id, "type": "function", "function": {"name": it.name, "arguments": it.arguments}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(it, FunctionCallOutputItem):
            messages.append({"role": "tool", "content": it.output, "tool_call_id": it.call_id})
    body: dict[str, Any] = {"messages": messages, "model": req.model, "profile": req.profile,
                            "max_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
                            "seed": req.seed, "chat_template_kwargs": req.chat_template_kwargs,
                            "parallel_tool_calls": req.parallel_tool_calls}
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = (req.tool_choice if isinstance(req.tool_choice, str)
                               else {"type": "function", "function": {"name": req.tool_choice.name}})
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                                          "strict": fmt.strict}}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:  # a message shape the chat side refuses
        raise validation_error(e) from None


class ResponseBuilder:
    """The Response object of one run, grown from (reasoning, content, calls) deltas; in streaming mode the
    typed events that say how it grew."""

    def __init__(self, req: ResponsesRequest, run: Run, model_id, prompt_len: int):
        self.req, self.run, self.model_id, self.prompt_len = req, run, model_id, prompt_len
        self.id = _new_id("resp")
        self.created = int(time.time())
        self.output: list[Any] = []
        self.open: OutputMessage | OutputReasoning | None = None  # the item text is being added to
        self.seq = 0

    def response(self, status: str, finish: str | None = None) -> ResponseObject:
        r = self.req
        fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else None
        obj = ResponseObject(id=self.id, created_at=self.created, status=status, model=self.model_id(),
                             profile=self.run.profile, output=list(self.output), instructions=r.instructions,
                             tools=r.tools or [], parallel_tool_calls=r.parallel_tool_calls is not False,
                             tool_choice=(r.tool_choice if isinstance(r.tool_choice, str) or r.tool_choice is None
                                          else r.tool_choice.model_dump()) or "auto",
                             temperature=r.temperature, top_p=r.top_p, max_output_tokens=r.max_output_tokens,
                             text={"format": fmt or {"type": "text"}}, metadata=r.metadata or {})
        if status != "in_progress":
            u = self.run.usage([self.prompt_len])
            obj.usage = ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                                      total_tokens=u.total_tokens)
        if finish == "length":
            obj.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        return obj

    def event(self, kind: str, **fields) -> str:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"

    # each method returns the events of what it did (ignored when not streaming)
    def _close(self) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        i = self.output.index(item)
        part = item.content[0]
        if isinstance(item, OutputMessage):
            ev = [self.event("response.output_text.done", item_id=item.id, output_index=i, content_index=0,
                             text=part.text, logprobs=[])]
        else:
            ev = [self.event("response.reasoning_text.done", item_id=item.id, output_index=i, content_index=0,
                             text=part.text)]
        ev.append(self.event("response.content_part.done", item_id=item.id, output_index=i, content_index=0,
                             part=dump(part)))
        item.status = "completed"
        ev.append(self.event("response.output_item.done", output_index=i, item=dump(item)))
        return ev

    def _text(self, kind: type, text: str) -> list[str]:
        if not text:
            return []
        ev: list[str] = []
        if not isinstance(self.open, kind):
            ev += self._close()
            part = OutputText(text="") if kind is OutputMessage else ReasoningText(text="")
            self.open = kind(id=_new_id("msg" if kind is OutputMessage else "rs"), status="in_progress",
                             content=[part])
            self.output.append(self.open)
            i = len(self.output) - 1
            ev.append(self.event("response.output_item.added", output_index=i, item=dump(self.open)))
            ev.append(self.event("response.content_part.added", item_id=self.open.id, output_index=i,
                                 content_index=0, part=dump(part)))
        self.open.content[0].text += text
        i = len(self.output) - 1
        name = "response.output_text.delta" if kind is OutputMessage else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind is OutputMessage else {}
        ev.append(self.event(name, item_id=self.open.id, output_index=i, content_index=0, delta=text, **extra))
        return ev

    def _call(self, c: ToolCall) -> list[str]:
        ev = self._close()
        item = OutputFunctionCall(id=_new_id("fc"), call_id=c.id, name=c.name, arguments="", status="in_progress")
        self.output.append(item)
        i = len(self.output) - 1
        ev.append(self.event("response.output_item.added", output_index=i, item=dump(item)))
        ev.append(self.event("response.function_call_arguments.delta", item_id=item.id, output_index=i,
                             delta=c.arguments))
        item.arguments, item.status = c.arguments, "completed"
        ev.append(self.event("response.function_call_arguments.done", item_id=item.id, output_index=i,
                             name=c.name, arguments=c.arguments))
        ev.append(self.event("response.output_item.done", output_index=i, item=dump(item)))
        return ev

    def add(self, reasoning: str, content: str, calls: list[ToolCall]) -> list[str]:
        ev = self._text(OutputReasoning, reasoning) + self._text(OutputMessage, content)
        for c in calls:
            ev += self._call(c)
        return ev

    def finish(self, reason: str | None) -> tuple[list[str], ResponseObject]:
        ev = self._close()
        status = "incomplete" if reason == "length" else "completed"
        for item in self.output:
            if status == "incomplete" and isinstance(item, OutputMessage):
                item.status = "incomplete"
        obj = self.response(status, reason)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        ev.append(self.event(kind, response=dump(obj)))
        return ev, obj


async def create_response(request: Request) -> JSONResponse | StreamingResponse:
    state: AppState = request.app.state.emo
    req = await parse_body(request, ResponsesRequest)
    if req.store:
        raise bad_request("store: this server keeps no responses; send store: false (or leave it out)", "store",
                          "unsupported_parameter")
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id: this server keeps no responses; send the whole conversation as "
                          "input items", "previous_response_id", "unsupported_parameter")
    if req.background:
        raise bad_request("background: not supported (responses are not stored)", "background",
                          "unsupported_parameter")
    chat = chat_request(req)
    run, prompt, splitters = await start_chat(state, request, chat, None)
    base = state.registry.base_name

    def model_id() -> str:
        return base if run.profile == "full" else f"{base}:{run.profile}"

    b = ResponseBuilder(req, run, model_id, len(prompt))
    if req.stream:
        return StreamingResponse(_stream(b, request, splitters[0]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    await run.collect(request)
    r = run.results[0]
    b.add(*splitters[0].feed(r.text, last=True))
    _, obj = b.finish(r.finish_reason)
    return JSONResponse(dump(obj))


def _stream(b: ResponseBuilder, request: Request, sp: OutputSplitter) -> AsyncIterator[str]:
    started = [False]

    def render(i: int, ev) -> str | None:
        out: list[str] = []
        if not started[0]:
            started[0] = True
            created = dump(b.response("in_progress"))
            out += [b.event("response.created", response=created), b.event("response.in_progress", response=created)]
        out += b.add(*sp.feed(ev.text, last=ev.finish_reason is not None))
        if ev.finish_reason is not None:
            out += b.finish(ev.finish_reason)[0]
        return "".join(out) or None

    return b.run.sse_stream(request, render)
