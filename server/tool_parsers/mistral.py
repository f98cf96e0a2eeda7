"""Mistral's form: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (tokenizers before v11), or
`[TOOL_CALLS]NAME[ARGS]{...}` per call (v11 and later). The block runs to the end of the output.

`[TOOL_CALLS]` is a special token in Mistral's own tokenizers: serve such a model with a tokenizer.json
that marks it non-special (as converted checkpoints do), or the decoded text loses the marker."""

from __future__ import annotations

import json

from .base import ToolCall, ToolFormat, arguments_text, json_rule, lark_str


class MistralFormat(ToolFormat):
    name = "mistral"
    start = "[TOOL_CALLS]"
    end = None

    def parse_block(self, block, tools):
        calls = []
        for part in block.split(self.start):  # later calls of the v11 form repeat the marker
            part = part.strip()
            if not part:
                continue
            if "[ARGS]" in part:
                name, args = part.split("[ARGS]", 1)
                text = arguments_text(args.strip())
                if text is None or not name.strip():
                    return None
                calls.append(ToolCall(name.strip(), text))
                continue
            items = json.loads(part)
            for it in items if isinstance(items, list) else [items]:
                text = arguments_text(it.get("arguments", {})) if isinstance(it, dict) else None
                if text is None or not isinstance(it.get("name"), str):
                    return None
                calls.append(ToolCall(it["name"], text))
        return calls or None

    def grammar(self, tools, parallel):
        # the JSON-list form: every call in one list after the marker
        calls = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                   "arguments": t.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array = {"type": "array", "items": items, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return f"start: {lark_str(self.start)} {json_rule(array)}\n"
