"""A multi-turn tool loop (call, tool result, answer) through the openai SDK on
a transformers-written tiny Qwen3-MoE with Qwen3's own chat template, served on
a profile. Every prompt the server builds must be the one transformers'
`apply_chat_template(tools=...)` renders from the same conversation."""

from __future__ import annotations

import json

import pytest

from tests.checkpoints import write_tokenizer
from tests.families import write_hf_checkpoint
from tests.test_server import Server, _openai

transformers = pytest.importorskip("transformers")

# Qwen3's chat template (Qwen3-30B-A3B's tokenizer_config.json), written here: nothing is downloaded
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools-qwen3")
    base = root / "tiny-qwen3"
    write_hf_checkpoint(base, "qwen3_moe", seed=21, max_position_embeddings=1024)
    write_tokenizer(base, 300)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN3_TEMPLATE}))
    pool = root / "pool.json"  # a profile: half of the experts of each MoE layer (layer 1 is dense)
    pool.write_text(json.dumps({"0": [0, 2, 4, 6], "2": [1, 3, 5, 7]}))
    server = Server(["--model", str(base), "--profile", f"half={pool}", "--served-model-name", "tiny-qwen3"],
                    root / "server.log").wait()
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"))
    ref.chat_template = QWEN3_TEMPLATE
    try:
        yield {"server": server, "ref": ref}
    finally:
        server.stop()


def _reference_ids(ref, messages, **kw) -> list[int]:
    """transformers' rendering of the conversation (a call's arguments as the object the JSON text holds)."""
    msgs = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        msgs.append(m)
    text = ref.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True, **kw)
    return ref.encode(text, add_special_tokens=False)


def test_tool_loop_call_result_answer_through_the_sdk(qwen):
    client = _openai(qwen["server"])
    ref = qwen["ref"]
    messages = [{"role": "system", "content": "You help with weather."},
                {"role": "user", "content": "Is it raining in Bergen?"}]
    first = client.chat.completions.create(model="tiny-qwen3:half", messages=messages, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=200, seed=0)
    assert first.usage.prompt_tokens == len(_reference_ids(ref, messages))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    assert first.model == "tiny-qwen3:half"
    messages.append({"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"rain": True, "mm": 4})})
    # the answer: the model chooses freely (auto) over a prompt holding the call and its result
    second = client.chat.completions.create(model="tiny-qwen3:half", messages=messages, tools=TOOLS,
                                            tool_choice="auto", max_tokens=8, seed=0)
    assert second.usage.prompt_tokens == len(_reference_ids(ref, messages))
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # streamed, with Qwen3's thinking switched off through chat_template_kwargs: the prompt closes an empty
    # think block, so the output is content, not reasoning
    stream = client.chat.completions.create(model="tiny-qwen3:half", messages=messages, tools=TOOLS, max_tokens=8,
                                            seed=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens == len(_reference_ids(ref, messages, enable_thinking=False))
    assert not any(getattr(c.delta, "reasoning_content", None) for ch in chunks for c in ch.choices)


def test_qwen3_template_picks_the_hermes_format_and_splits_reasoning(qwen):
    """The template writes <tool_call>{json}</tool_call> and mentions <think>: a reply that thinks first and then
    calls comes back as reasoning_content + tool_calls (the model's text fed through the same splitter)."""
    from server.reasoning import ReasoningSplitter, enabled
    from server.tool_parsers import extract, format_for

    assert format_for(QWEN3_TEMPLATE).name == "hermes" and enabled(QWEN3_TEMPLATE)
    out = ('<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
           '{"city": "Bergen"}}\n</tool_call>')
    sp = ReasoningSplitter("<|im_start|>assistant\n")
    r, c = sp.feed(out)
    r2, c2 = sp.finish()
    content, calls = extract(format_for(QWEN3_TEMPLATE), c + c2, [t["function"] for t in TOOLS])
    assert (r + r2).strip() == "The user wants weather." and content is None
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Bergen"}
