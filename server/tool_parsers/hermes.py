"""Hermes-style calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`:
Qwen3, Qwen3.5, Qwen2.5, Hermes and many fine-tunes (and the bundled demo's template)."""

from __future__ import annotations

import json

from .base import ToolCall, ToolFormat, arguments_text, calls_rule, json_rule


class HermesFormat(ToolFormat):
    name = "hermes"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_block(self, block, tools):
        obj = json.loads(block)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = arguments_text(obj.get("arguments", obj.get("parameters", {})))
        return None if args is None else [ToolCall(obj["name"], args)]

    def grammar(self, tools, parallel):
        # one JSON object per call: the name fixes which parameter schema its arguments follow
        calls = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                   "arguments": t.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return calls_rule([json_rule(schema)], parallel, "<tool_call>\n", "\n</tool_call>", sep="\n")
