"""Typed results of the emo-serve HTTP API (docs/http-api.md).

Every model keeps fields it does not know (`extra="allow"`), so a server that
adds a field never breaks an older client; the field is on `model_extra`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Usage(_Result):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Choice(_Result):
    index: int = 0
    text: str = ""
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class Completion(_Result):
    """A `text_completion` object; `profile` says which profile served it."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    profile: str | None = None
    choices: list[Choice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        """Text of the first choice ("" when there is none)."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One server-sent event of a streamed completion: `text` is a delta."""


class ChatMessage(_Result):
    role: str
    content: str | None = None


class ChatChoice(_Result):
    index: int = 0
    message: ChatMessage | None = None
    delta: ChatMessage | dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(_Result):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    profile: str | None = None
    choices: list[ChatChoice] = []
    usage: Usage | None = None

    @property
    def text(self) -> str:
        if not self.choices or self.choices[0].message is None:
            return ""
        return self.choices[0].message.content or ""


class ChatCompletionChunk(ChatCompletion):
    object: str = "chat.completion.chunk"


class ModelInfo(_Result):
    """An entry of `GET /v1/models`: the base model and each `<base>:<profile>`."""

    id: str
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None

    @property
    def base(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def profile(self) -> str | None:
        return self.id.split(":", 1)[1] if ":" in self.id else None


class ProfileInfo(_Result):
    """An entry of `GET /v1/profiles` (the reserved `full` profile is one too).

    emo-serve reports `experts_per_layer` as {layer: experts}, `bytes` as
    {"experts", "non_expert", "total"} and `coverage` as {layer: share}; plain
    numbers and lists are accepted as well. The properties below read either.
    """

    name: str
    id: str | None = None
    kind: str | None = None
    experts_per_layer: dict[str, int] | list[int] | int | None = None
    experts_total: int | None = None
    bytes: dict[str, int] | int | None = None
    coverage: dict[str, float] | list[float] | float | None = None
    mean_coverage: float | None = None
    resident: bool | None = None
    resident_bytes: int | None = None

    @property
    def total_experts(self) -> int | None:
        if self.experts_total is not None:
            return self.experts_total
        e = self.experts_per_layer
        if isinstance(e, dict):
            return sum(e.values())
        if isinstance(e, list):
            return sum(e)
        return e

    @property
    def expert_bytes(self) -> int | None:
        """Bytes of this profile's experts."""
        return self.bytes.get("experts") if isinstance(self.bytes, dict) else self.bytes

    @property
    def total_bytes(self) -> int | None:
        """Bytes of its experts plus the model's non-expert weights, when reported."""
        if isinstance(self.bytes, dict):
            return self.bytes.get("total", self.bytes.get("experts"))
        return self.bytes

    @property
    def average_coverage(self) -> float | None:
        if self.mean_coverage is not None:
            return self.mean_coverage
        c = self.coverage
        if isinstance(c, dict):
            c = list(c.values())
        if isinstance(c, list):
            return sum(c) / len(c) if c else None
        return c


class Health(_Result):
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


__all__ = [
    "Usage",
    "Choice",
    "Completion",
    "CompletionChunk",
    "ChatMessage",
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ModelInfo",
    "ProfileInfo",
    "Health",
]
