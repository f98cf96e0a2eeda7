"""GLM-4.5's form: `<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...</tool_call>`;
a value is bare text, typed by the tool's parameter schema."""

from __future__ import annotations

import json
import re

from .base import ToolCall, ToolFormat, parameter_value

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
