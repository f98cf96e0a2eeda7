"""What every tool-call format shares: the call object, the streaming
extractor that splits a model's output into content and calls, and the
conversion of a parameter's text to its JSON value.

A format declares the marker that opens a block of calls, the marker that
closes it (None: the block runs to the end of the output), how a block reads
as calls, and (optionally) a Lark grammar that makes the model write only
calls (`tool_choice` required or named). The extractor is the same for all
formats: text outside blocks is content (a possible beginning of the start
marker is held back, so a marker split across streamed chunks is never leaked),
a block is held until it closes and then released as calls; a block that does
not read as calls is released as content, as written. Nothing here raises on
model output.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def arguments_text(args: Any) -> str | None:
    """The JSON text of a call's arguments (an object, or a string holding one); None when it is neither."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return json.dumps(args, ensure_ascii=False)


def parameter_value(text: str, schema: dict[str, Any] | None) -> Any:
    """A parameter written as bare text (Qwen3-Coder's and GLM's XML forms) as
    its JSON value: a string when the schema says string (or the text is not
    JSON), else what the text parses to."""
    t = text[1:] if text.startswith("\n") else text
    t = t[:-1] if t.endswith("\n") else t
    kind = (schema or {}).get("type")
    if kind == "string":
        return t
    try:
        return json.loads(t)
    except ValueError:
        return t


# -- grammars (Lark text in llguidance's dialect) -----------------------------------------

def lark_str(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


def json_rule(schema: dict[str, Any] | None) -> str:
    """An inline Lark rule for JSON of `schema` (compact: no runs of blanks)."""
    schema = dict(schema or {"type": "object"})
    schema["x-guidance"] = {"whitespace_flexible": False}
    return "%json " + json.dumps(schema)


def bare_value_rule(schema: dict[str, Any] | None, stop: str = "<") -> str:
    """A parameter value written as bare text (XML-style formats): a string as its characters (never `stop`,
    which starts the closing tag; at most maxLength of them), an enum of strings as one of them, anything
    else as JSON."""
    schema = schema or {}
    if schema.get("type") == "string":
        if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
            return "(" + " | ".join(lark_str(v) for v in schema["enum"]) + ")"
        most = schema.get("maxLength")
        count = f"{{{int(schema.get('minLength', 0))},{int(most)}}}" if isinstance(most, int) else "*"
        return f"/[^{stop}]{count}/"
    return json_rule(schema)


def calls_rule(alternatives: list[str], parallel: bool, open_: str, close: str, sep: str = "") -> str:
    """`start:` over one call (several when `parallel`, `sep` between them), each `open_`, one of the
    alternatives (rule names), `close`."""
    many = f"call ({lark_str(sep)} call)*" if sep else "call+"
    return f"start: {many if parallel else 'call'}\ncall: {lark_str(open_)} ({' | '.join(alternatives)}) " \
           f"{lark_str(close)}\n"


def tool_rules(tools: list[dict], body) -> tuple[list[str], str]:
    """(rule names, rule text): one rule `f<i>` per tool, its right-hand side `body(tool)`."""
    names = [f"f{i}" for i in range(len(tools))]
    return names, "".join(f"{n}: {body(t)}\n" for n, t in zip(names, tools))


def parameter_rules(tool: dict, one) -> str:
    """The tool's parameters in schema order, `one(key, schema)` each; the ones not required optional."""
    params = tool.get("parameters") or {}
    required = set(params.get("required") or [])
    parts = []
    for k, sch in (params.get("properties") or {}).items():
        rule = one(k, sch if isinstance(sch, dict) else {})
        parts.append(rule if k in required else f"({rule})?")
    return " ".join(parts)


class ToolFormat:
    """One model family's way of writing tool calls (subclasses fill these in)."""

    name = ""
    start = ""
    end: str | None = None

    def parse_block(self, block: str, tools: dict[str, dict]) -> list[ToolCall] | None:
        """The calls of one block (between `start` and `end`); None when it does not read as calls."""
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool) -> str | None:
        """Lark text of output made only of calls to `tools` (each {"name", "parameters"}), or None when
        this format cannot be constrained."""
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallExtractor:
    """Splits one choice's output, fed as it streams, into content and calls."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]):
        self.fmt = fmt
        self.tools = {t["name"]: t.get("parameters") or {} for t in tools}
        self.buf = ""  # text not released yet
        self.in_block = False
        self.calls: list[ToolCall] = []
        self.pending_ws = ""  # whitespace held back: dropped at the end when there were calls

    def _release(self, text: str) -> str:
        if not text:
            return ""
        if not text.strip():
            self.pending_ws += text
            return ""
        out, self.pending_ws = self.pending_ws + text, ""
        return out

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Content that may be shown now and the calls completed by `delta`."""
        self.buf += delta
        content, calls = "", []
        while True:
            if not self.in_block:
                i = self.buf.find(self.fmt.start)
                if i < 0:
                    keep = _partial_suffix(self.buf, self.fmt.start)
                    content += self._release(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self._release(self.buf[:i])
                self.buf = self.buf[i + len(self.fmt.start):]
                self.in_block = True
            if self.fmt.end is None:
                break
            j = self.buf.find(self.fmt.end)
            if j < 0:
                break
            block, self.buf = self.buf[:j], self.buf[j + len(self.fmt.end):]
            self.in_block = False
            got = self._parse(block)
            if got is None:
                content += self._release(self.fmt.start + block + self.fmt.end)
            else:
                calls += got
        return content, calls

    def _parse(self, block: str) -> list[ToolCall] | None:
        try:
            got = self.fmt.parse_block(block, self.tools)
        except Exception:  # model output is never a server error
            got = None
        if got is not None:
            self.calls += got
        return got

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What is left once the output ended: an open block is parsed as it stands (formats without an end
        marker end here), and released as content when it does not read as calls."""
        content, calls = "", []
        if self.in_block:
            got = self._parse(self.buf)
            if got is None:
                content = self._release(self.fmt.start + self.buf)
            else:
                calls = got
        else:
            content = self._release(self.buf)
        self.buf, self.in_block = "", False
        if self.pending_ws and not self.calls:
            content += self.pending_ws
        self.pending_ws = ""
        return content, calls


def extract(fmt: ToolFormat, text: str, tools: list[dict]) -> tuple[str | None, list[ToolCall]]:
    """A whole output's content (None when it is only calls and whitespace) and calls."""
    x = ToolCallExtractor(fmt, tools)
    c1, k1 = x.feed(text)
    c2, k2 = x.finish()
    content = c1 + c2
    calls = k1 + k2
    return (content if content.strip() or not calls else None), calls
