"""gpt-oss's harmony format, read from the decoded text with its special tokens
kept (`skip_special_tokens: false` for the sequence). The prompt ends with
`<|start|>assistant`; the output is messages

    <|channel|>CHANNEL[ to=functions.NAME][ <|constrain|>json]<|message|>TEXT<|end|>|<|call|>|<|return|>

each but the first opened by `<|start|>assistant`: channel `analysis` is
reasoning, `final` (and `commentary` without a recipient) is content, a
message to `functions.NAME` is a call whose arguments are its text. `<|call|>`
and `<|return|>` are end-of-sequence tokens, so the last message ends with
the output.

Written by hand: the `openai-harmony` package reads the o200k vocabulary from
the network at run time, which a server here cannot do. Calls are not
constrained in this format (tool_choice required / named is refused)."""

from __future__ import annotations

import re

from .base import ToolCall, ToolFormat, arguments_text

_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
_RECIPIENT = re.compile(r"\bto=functions\.([^\s<]+)")


class HarmonyFormat(ToolFormat):
    name = "harmony"
    start = "<|channel|>"
    end = None


def _held(text: str) -> int:
    """Characters at the end of `text` that may begin a marker."""
    i = text.rfind("<")
    return len(text) - i if i >= 0 and any(m.startswith(text[i:]) for m in _MARKERS) else 0


class HarmonySplitter:
    """One choice's output, fed as it streams, as (reasoning, content, completed calls)."""

    def __init__(self, tools: list[dict]):
        self.tools = {t["name"] for t in tools}
        self.buf = ""
        self.header: str | None = None  # the current message's header, once its <|message|> arrived
        self._closing_header = ""
        self.args = ""  # a call's text so far
        self.calls: list[ToolCall] = []

    def _kind(self) -> str:
        h = self.header or ""
        if _RECIPIENT.search(h):
            return "call"
        channel = h.split("<|channel|>")[-1].split()
        return "reasoning" if channel and channel[0] == "analysis" else "content"

    def _close(self, text: str) -> tuple[str, str, list[ToolCall]]:
        """The current message ends with `text` (its last piece)."""
        kind, self.header = self._kind(), None
        if kind == "call":
            # the header names the function; a call whose text is not a JSON object stays content
            m = _RECIPIENT.search(self._closing_header)
            full, self.args = self.args + text, ""
            args = arguments_text(full.strip())
            if m and args is not None:
                call = ToolCall(m.group(1), args)
                self.calls.append(call)
                return "", "", [call]
            return "", full, []
        return ("", text, []) if kind == "content" else (text, "", [])

    def feed(self, delta: str, last: bool = False) -> tuple[str, str, list[ToolCall]]:
        self.buf += delta
        reasoning = content = ""
        calls: list[ToolCall] = []
        while True:
            if self.header is None:  # in a header: wait for <|message|>
                i = self.buf.find("<|message|>")
                if i < 0:
                    break
                head = self.buf[:i]
                self.header = head.replace("<|constrain|>", " ")  # the recipient may sit before the channel
                self._closing_header = self.header
                self.buf = self.buf[i + len("<|message|>"):]
                continue
            ends = [(self.buf.find(m), m) for m in ("<|end|>", "<|call|>", "<|return|>", "<|start|>")]
            ends = [(i, m) for i, m in ends if i >= 0]
            if ends:
                i, m = min(ends)
                r, c, k = self._close(self.buf[:i])
                reasoning, content, calls = reasoning + r, content + c, calls + k
                self.buf = self.buf[i + len(m):]
                if m != "<|start|>" and self.buf.startswith("<|start|>"):
                    self.buf = self.buf[len("<|start|>"):]
                continue
            keep = 0 if last else _held(self.buf)
            piece, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if self._kind() == "call":
                self.args += piece
            elif self._kind() == "reasoning":
                reasoning += piece
            else:
                content += piece
            break
        if last:
            if self.header is not None:
                r, c, k = self._close(self.buf)
                reasoning, content, calls = reasoning + r, content + c, calls + k
            elif self.buf.strip():  # text outside any message: shown as it came
                content += self.buf
            self.buf = ""
        return reasoning, content, calls
