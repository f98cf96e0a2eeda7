"""DeepSeek-V3's form: between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`, each call
`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>`
(V3.1 drops the type and the fence: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`)."""

from __future__ import annotations

import re

from .base import ToolCall, ToolFormat, arguments_text, json_rule, lark_str, tool_rules

_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", re.S)
_FENCED = re.compile(r"^\s*([^\n]+?)\s*\n```(?:json)?\s*\n(.*?)\n?```\s*$", re.S)


class DeepSeekV3Format(ToolFormat):
    name = "deepseek_v3"
    start = "<｜tool▁calls▁begin｜>"
    end = "<｜tool▁calls▁end｜>"

    def parse_block(self, block, tools):
        found = _CALL.findall(block)
        if not found:
            return None
        calls = []
        for head, rest in found:
            if head.strip() == "function":  # V3: the name starts the part after the separator, then a fence
                m = _FENCED.match(rest)
                if m is None:
                    return None
                name, args = m.group(1), m.group(2)
            else:
                name, args = head, rest
            text = arguments_text(args.strip())
            if text is None or not name.strip():
                return None
            calls.append(ToolCall(name.strip(), text))
        return calls

    def grammar(self, tools, parallel):
        # V3's form: every call inside one begin/end block
        def body(tool):
            return " ".join([lark_str(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{tool['name']}\n```json\n"),
                             json_rule(tool.get("parameters")), lark_str("\n```<｜tool▁call▁end｜>")])

        names, rules = tool_rules(tools, body)
        call = "(" + " | ".join(names) + ")"
        return (f"start: {lark_str(self.start)} {call}{'+' if parallel else ''} {lark_str(self.end)}\n" + rules)
