"""Tool-call formats, one module each, and the choice of one for a model:
`--tool-call-parser NAME` wins; otherwise the chat template says (the markers
it writes), and Hermes is the default."""

from __future__ import annotations

from .base import ToolCall, ToolCallExtractor, ToolFormat, extract
from .deepseek_v3 import DeepSeekV3Format
from .glm45 import Glm45Format
from .harmony import HarmonyFormat, HarmonySplitter
from .hermes import HermesFormat
from .mistral import MistralFormat
from .qwen3_coder import Qwen3CoderFormat

FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (HermesFormat, Qwen3CoderFormat, Glm45Format,
                                                             DeepSeekV3Format, MistralFormat, HarmonyFormat)}


def format_for(template: str | None, override: str | None = None) -> ToolFormat:
    if override is not None:
        return FORMATS[override]()
    t = template or ""
    if "<|channel|>" in t:
        return HarmonyFormat()
    if "<function=" in t and "<parameter=" in t:
        return Qwen3CoderFormat()
    if "<arg_key>" in t:
        return Glm45Format()
    if "tool▁calls▁begin" in t:
        return DeepSeekV3Format()
    if "[TOOL_CALLS]" in t:
        return MistralFormat()
    return HermesFormat()


__all__ = ["FORMATS", "HarmonyFormat", "HarmonySplitter", "ToolCall", "ToolCallExtractor", "ToolFormat", "extract", "format_for"]
