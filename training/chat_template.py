"""The bundled demo's chat template: written into `tokenizer_config.json` of the
demo model and of every profile under it, whose manifests then record the new
file hashes (`emo-subset verify` stays green).

    python -m training.chat_template modeling/bundled/emo-demo

A minimal role-tagged format (short, tools listed by name and
parameter names: the demo's context is 256 tokens; the grammar, not the prompt, holds their schemas) with Hermes-style tool calls (`<tool_call>{"name",
"arguments"}</tool_call>`, what server.tool_parsers reads by default), so that
chat, tools and structured output work on the demo out of the box. The demo
was never trained on it: it is the frame constrained decoding fills in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modeling.io.profile import PROFILE_FILE, ProfileManifest, file_hashes, shard_files

TEMPLATE = """{%- if tools %}
<|system|>
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Tools; call as <tool_call>{"name", "arguments"}</tool_call>:
{% for t in tools %}- {{ t.function.name }}({{ ((t.function.parameters or {}).properties or {}) | join(', ') }})\
{% if t.function.description %}: {{ t.function.description }}{% endif %}

{% endfor %}
{% endif %}
{%- for m in messages %}
{%- if not (tools and loop.first and m.role == 'system') %}
<|{{ m.role }}|>
{{ m.content if m.content is string else '' }}
{%- for c in m.tool_calls or [] %}
<tool_call>
{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}

{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{% endif %}
"""


def set_template(folder: Path, template: str) -> None:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if (folder / PROFILE_FILE).is_file():  # a profile: its manifest records the file's new hash
        m = ProfileManifest.read(folder)
        m.files = file_hashes(folder, exclude=set(shard_files(folder)))
        m.write(folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the demo model folder (its profiles/ are updated too)")
    args = p.parse_args(argv)
    folders = [args.model] + sorted(d for d in (args.model / "profiles").glob("*") if (d / PROFILE_FILE).is_file())
    for f in folders:
        set_template(f, TEMPLATE)
        print(f"{f}: chat template set")


if __name__ == "__main__":
    main()
