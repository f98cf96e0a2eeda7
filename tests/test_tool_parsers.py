"""Tool-call formats and the reasoning split on recorded model outputs (each
format's own way of writing calls, as the models' chat templates and
documentation show it), well-formed and malformed, whole and streamed: every
output is also fed in two chunks split at every character boundary and one
character at a time, and must give the same content and calls."""

from __future__ import annotations

import json

import pytest

from server.reasoning import ReasoningSplitter
from server.tool_parsers import FORMATS, ToolCallExtractor, extract, format_for

TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
             "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
             "zip": {"type": "string"}}}},
         {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]

PARIS = {"city": "Paris", "days": 3}
# (format, recorded output, expected content, expected [(name, arguments)])
RECORDED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               "</tool_call>", "Let me check.\n", [("get_weather", PARIS)]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
               '<tool_call>\n{"name": "search", "arguments": "{\\"q\\": \\"caf\\u00e9 \\u00e0 Paris\\"}"}\n</tool_call>',
     None, [("get_weather", PARIS), ("search", {"q": "café à Paris"})]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    # malformed: broken JSON, a missing name, an unterminated block -> all returned as text
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", 'ok <tool_call>\n{"name": "search", "argu', 'ok <tool_call>\n{"name": "search", "argu', []),
    ("qwen3_coder", "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n<parameter=zip>\n75001\n</parameter>\n</function>\n"
                    "</tool_call>", "I'll look.\n", [("get_weather", {**PARIS, "zip": "75001"})]),
    ("qwen3_coder", "<tool_call>\n<function=search>\n<parameter=q>\nline one\nline two\n</parameter>\n</function>\n"
                    "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=metric>\ntrue\n</parameter>\n"
                    "</function>\n</tool_call>", None,
     [("search", {"q": "line one\nline two"}), ("get_weather", {"metric": True})]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>",
     "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>", []),
    ("glm45", "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "Checking.",
     [("get_weather", PARIS)]),
    ("glm45", "<tool_call>\n<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
     "<tool_call>\n<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", []),
    ("deepseek_v3", "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                    'search\n```json\n{"q": "rain"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Sure.",
     [("get_weather", PARIS), ("search", {"q": "rain"})]),
    ("deepseek_v3", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>search<｜tool▁sep｜>{"q": "v3.1"}<｜tool▁call▁end｜>'
                    "<｜tool▁calls▁end｜>", None, [("search", {"q": "v3.1"})]),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{bad}\n```"
                    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
     "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{bad}\n```"
     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                '{"name": "search", "arguments": {"q": "x"}}]', None,
     [("get_weather", PARIS), ("search", {"q": "x"})]),
    ("mistral", 'Hm.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]search[ARGS]{"q": "y"}',
     "Hm.", [("get_weather", PARIS), ("search", {"q": "y"})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ', '[TOOL_CALLS][{"name": "get_weather", '
                '"arguments": {"city": ', []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _streamed(fmt, chunks):
    x = ToolCallExtractor(FORMATS[fmt](), TOOLS)
    content, calls = "", []
    for ch in chunks:
        c, k = x.feed(ch)
        content += c
        calls += k
    c, k = x.finish()
    return content + c, calls + k


@pytest.mark.parametrize("fmt,text,content,calls", RECORDED, ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
def test_recorded_outputs_whole_and_split_at_every_boundary(fmt, text, content, calls):
    got_content, got_calls = extract(FORMATS[fmt](), text, TOOLS)
    assert got_content == content
    assert _calls(got_calls) == calls
    want = content or ""
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for chunks in splits:
        c, k = _streamed(fmt, chunks)
        assert c.strip() == want.strip(), chunks  # whitespace around calls is dropped however the text is split
        assert _calls(k) == calls, chunks


def test_streamed_content_never_shows_a_marker_before_its_block_is_judged():
    fmt = FORMATS["hermes"]()
    text = RECORDED[0][1]
    x = ToolCallExtractor(fmt, TOOLS)
    shown = ""
    for ch in text:
        shown += x.feed(ch)[0]
        assert "<tool" not in shown and "<" not in shown.replace("Let me check.\n", "")


def test_format_is_chosen_from_the_chat_template_or_the_flag():
    assert format_for("... <tool_call>\n<function=x>\n<parameter=y> ...").name == "qwen3_coder"
    assert format_for("... <arg_key>{{ k }}</arg_key> ...").name == "glm45"
    assert format_for("<｜tool▁calls▁begin｜>").name == "deepseek_v3"
    assert format_for("[AVAILABLE_TOOLS] [TOOL_CALLS]").name == "mistral"
    assert format_for("<tool_call>").name == "hermes" and format_for(None).name == "hermes"
    assert format_for("<tool_call>", override="mistral").name == "mistral"


def test_call_ids_are_unique_and_calls_carry_openai_shape():
    _, calls = extract(FORMATS["hermes"](), RECORDED[1][1], TOOLS)
    assert len({c.id for c in calls}) == 2
    d = calls[0].to_openai()
    assert d["type"] == "function" and json.loads(d["function"]["arguments"]) == PARIS


THINK = [
    # (prompt tail, output, reasoning, content)
    ("<|im_start|>assistant\n", "<think>\nI should add.\n</think>\n\nThe sum is 5.", "\nI should add.\n",
     "The sum is 5."),
    ("<|im_start|>assistant\n<think>\n", "Add them.\n</think>\n\n5", "Add them.\n", "5"),  # template opened it
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "5, no thinking.", "", "5, no thinking."),  # switched off
    ("<|im_start|>assistant\n", "Plain answer <think> in the middle", "", "Plain answer <think> in the middle"),
    ("<|im_start|>assistant\n", "<think>cut short by max_tokens", "cut short by max_tokens", ""),
]


@pytest.mark.parametrize("prompt,text,reasoning,content", THINK)
def test_reasoning_split_whole_and_at_every_boundary(prompt, text, reasoning, content):
    for chunks in [[text]] + [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        sp = ReasoningSplitter(prompt)
        r = c = ""
        for ch in chunks:
            a, b = sp.feed(ch)
            r, c = r + a, c + b
        a, b = sp.finish()
        assert (r + a, c + b) == (reasoning, content), chunks


GRAMMAR_TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city"], "additionalProperties": False}},
    {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
]


@pytest.mark.parametrize("fmt", sorted(f for f in FORMATS if f != "harmony"))  # harmony: not constrained
@pytest.mark.parametrize("parallel", [False, True])
def test_every_formats_grammar_yields_calls_its_parser_reads(fmt, parallel):
    """Forced calls (tool_choice required) in every format: random tokens sampled under the format's grammar,
    on the demo vocabulary, always decode to calls of the given tools whose arguments follow their schemas."""
    import jsonschema
    import torch

    from modeling import load_model
    from modeling.structured import GrammarCompiler

    model = load_model("modeling/bundled/emo-demo")
    tok = model.tokenizer
    comp = GrammarCompiler(tok.path, model.config.vocab_size, tok.eos_token_ids)
    grammar = comp.check(comp.lark(FORMATS[fmt]().grammar(GRAMMAR_TOOLS, parallel)))
    schemas = {t["name"]: t["parameters"] for t in GRAMMAR_TOOLS}
    for seed in range(4):
        c = comp.constraint(grammar)
        g, out = torch.Generator().manual_seed(seed), []
        for _ in range(400):  # a token drawn uniformly from the ones the grammar allows
            allowed = c.allowed().nonzero().flatten()
            t = int(allowed[torch.randint(len(allowed), (1,), generator=g)])
            if t in tok.eos_token_ids:
                break
            out.append(t)
            assert c.accept(t)
            if c.done:
                break
        else:
            raise AssertionError("the grammar never ended")
        content, calls = extract(FORMATS[fmt](), tok.decode(out), GRAMMAR_TOOLS)
        assert content is None and calls, tok.decode(out)
        assert parallel or len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])


HARMONY = [
    # (output with special tokens kept, reasoning, content, calls)
    ("<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}',
     "User wants weather.", "", [("get_weather", PARIS)]),
    ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is 5.",
     "Easy.", "It is 5.", []),
    ('<|start|>assistant to=functions.search<|channel|>commentary json<|message|>{"q": "x"}', "", "",
     [("search", {"q": "x"})]),
    # malformed: a call whose text is not JSON stays content
    ("<|channel|>commentary to=functions.search<|message|>{oops", "", "{oops", []),
]


@pytest.mark.parametrize("text,reasoning,content,calls", HARMONY)
def test_harmony_channels_whole_and_at_every_boundary(text, reasoning, content, calls):
    from server.tool_parsers import HarmonySplitter

    for chunks in [[text]] + [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        sp = HarmonySplitter(TOOLS)
        r = c = ""
        k = []
        for j, ch in enumerate(chunks):
            a, b, got = sp.feed(ch, last=j == len(chunks) - 1)
            r, c, k = r + a, c + b, k + got
        assert (r, c, _calls(k)) == (reasoning, content, calls), chunks
    assert format_for("{{ '<|start|>assistant<|channel|>final<|message|>' }}").name == "harmony"
