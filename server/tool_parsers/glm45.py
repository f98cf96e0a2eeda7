"""GLM-4.5's form: `<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...</tool_call>`;
a value is bare text, typed by the tool's parameter schema."""

from __future__ import annotations

import json
import re

from .base import (ToolCall, ToolFormat, bare_value_rule, calls_rule, lark_str, parameter_rules, parameter_value,
                   tool_rules)

_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


class Glm45Format(ToolFormat):
    name = "glm45"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_block(self, block, tools):
        name = block.split("<arg_key>", 1)[0].strip()
        if not name or "<" in name or "\n" in name:
            return None
        props = (tools.get(name) or {}).get("properties") or {}
        args = {k.strip(): parameter_value(v, props.get(k.strip())) for k, v in _ARG.findall(block)}
        return [ToolCall(name, json.dumps(args, ensure_ascii=False))]

    def grammar(self, tools, parallel):
        def parameter(key, schema):
            return " ".join([lark_str(f"<arg_key>{key}</arg_key>\n<arg_value>"), bare_value_rule(schema),
                             lark_str("</arg_value>\n")])

        def body(tool):
            return " ".join([lark_str(tool["name"] + "\n"), parameter_rules(tool, parameter)])

        names, rules = tool_rules(tools, body)
        return calls_rule(names, parallel, "<tool_call>", "</tool_call>", sep="\n") + rules
