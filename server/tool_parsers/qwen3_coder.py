"""Qwen3-Coder's XML form:
`<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>`;
a value is bare text, typed by the tool's parameter schema."""

from __future__ import annotations

import json
import re

from .base import (ToolCall, ToolFormat, bare_value_rule, calls_rule, lark_str, parameter_rules, parameter_value,
                   tool_rules)

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


class Qwen3CoderFormat(ToolFormat):
    name = "qwen3_coder"
    start = "<tool_call>"
    end = "</tool_call>"

    def parse_block(self, block, tools):
        found = _FUNCTION.findall(block)
        if not found:
            return None
        calls = []
        for name, body in found:
            name = name.strip()
            props = (tools.get(name) or {}).get("properties") or {}
            args = {k.strip(): parameter_value(v, props.get(k.strip())) for k, v in _PARAMETER.findall(body)}
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        return calls

    def grammar(self, tools, parallel):
        def parameter(key, schema):
            return " ".join([lark_str(f"<parameter={key}>\n"), bare_value_rule(schema), lark_str("\n</parameter>\n")])

        def body(tool):
            return " ".join([lark_str(f"<function={tool['name']}>\n"), parameter_rules(tool, parameter),
                             lark_str("</function>\n")])

        names, rules = tool_rules(tools, body)
        return calls_rule(names, parallel, "<tool_call>\n", "</tool_call>", sep="\n") + rules
