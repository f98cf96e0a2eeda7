"""Reasoning split out of the content, as vLLM's reasoning parsers do: the text
a model writes between `<think>` and `</think>` (Qwen3 thinking, GLM-4.5,
DeepSeek-R1 style templates) goes to `reasoning_content`.

Chosen from the chat template (it mentions `<think>`) unless
`--reasoning-parser` says otherwise. The template's switch is honoured through
`chat_template_kwargs` (Qwen3's `enable_thinking: false` closes an empty think
block in the prompt, so the output is all content); a template that opens the
block in the prompt itself makes the output start inside it."""

from __future__ import annotations

START, END = "<think>", "</think>"


def enabled(template: str | None, override: str | None = None) -> bool:
    if override is not None:
        return override == "think"
    return START in (template or "")


def _partial(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningSplitter:
    """One choice's output, fed as it streams, as (reasoning, content) deltas."""

    def __init__(self, prompt_text: str):
        # the prompt itself opened a think block (and did not close it): the output starts inside it
        tail = prompt_text.rstrip()
        self.state = "reasoning" if tail.endswith(START) else "start"
        self.buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        if self.state == "start":
            lead = self.buf.lstrip()
            if lead.startswith(START):
                self.buf, self.state = lead[len(START):], "reasoning"
            elif START.startswith(lead):
                return "", ""  # maybe the opening marker, not complete yet
            else:
                self.state = "content"
        if self.state == "reasoning":
            i = self.buf.find(END)
            if i < 0:
                keep = _partial(self.buf, END)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf, self.state = self.buf[:i], self.buf[i + len(END):].lstrip("\n"), "content"
            if not self.buf:
                self.state = "after"  # newlines right after the closing marker are dropped too
                return reasoning, ""
        if self.state == "after":
            self.buf = self.buf.lstrip("\n")
            if not self.buf:
                return reasoning, ""
            self.state = "content"
        content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is held back once the output ended (an unclosed block is reasoning, cut short)."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest if self.state != "after" else ""
