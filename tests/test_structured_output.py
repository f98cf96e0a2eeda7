"""Structured output, tool calls and the Responses API on the bundled demo
model (its minimal chat template), through a real emo-serve process and the
`openai` SDK unchanged. The demo is a tiny model trained on code and prose: it
never writes JSON or tool calls by itself, so every valid instance below is
the work of grammar-constrained decoding."""

from __future__ import annotations

import json
import random
from typing import Annotated
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.test_server import Server, _openai

PROFILE_MODEL = "emo-demo:python"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    log = tmp_path_factory.mktemp("structured") / "demo.log"
    s = Server(["--max-batch", "16"], log).wait()
    try:
        yield s
    finally:
        s.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    languages: list[Annotated[str, Field(max_length=10)]] = Field(max_length=3)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the docs",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 20},
                                                    "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["query"], "additionalProperties": False}}}


def _check_call(call, tools=(WEATHER, SEARCH)):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.function.name in by_name
    jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


def test_sdk_parse_returns_a_valid_pydantic_instance_on_a_profile(demo):
    client = _openai(demo)
    r = client.chat.completions.parse(model=PROFILE_MODEL, messages=[{"role": "user", "content": "A person?"}],
                                      response_format=Person, max_tokens=120, seed=3)
    choice = r.choices[0]
    assert isinstance(choice.message.parsed, Person), choice.message.content
    assert choice.finish_reason == "stop" and r.model == PROFILE_MODEL
    # the same request without the format: the demo writes no JSON at all
    free = client.chat.completions.create(model=PROFILE_MODEL, messages=[{"role": "user", "content": "A person?"}],
                                          max_tokens=40, seed=3)
    with pytest.raises(ValueError):
        Person.model_validate_json(free.choices[0].message.content)


# a fixed set of schemas (strings, integers and arrays bounded so that a 120-token budget always holds the value:
# a free float's digits are not bounded by a range, so floats appear as enums)
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -50, "maximum": 50},
                                      "x": {"enum": [0.5, 1.25, -3e-2]}},
     "required": ["n", "x"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "name": {"type": "string", "maxLength": 12}},
        "required": ["id", "name"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "xy": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 2}},
     "required": ["kind", "xy"], "additionalProperties": False},
    {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "integer", "minimum": 0, "maximum": 100}]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{8}$"},
                                      "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["id", "note"], "additionalProperties": False},
    {"$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 6},
                                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["sku", "qty"], "additionalProperties": False}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "level": {"enum": [1, 2, 3, None]}},
     "required": ["when", "level"], "additionalProperties": False},
]


def test_100_of_100_structured_outputs_are_valid_json_of_their_schema(demo):
    """Random schemas of the fixed set, sampled at temperature 1 on random profiles, 16 at a time."""
    rnd = random.Random(18)
    jobs = [(rnd.randrange(len(SCHEMAS)), rnd.choice(["python", "prose", "c", "arith", "full"]), rnd.randrange(10**6))
            for _ in range(100)]

    def one(job):
        k, profile, seed = job
        body = {"model": "emo-demo", "profile": profile, "max_tokens": 120, "temperature": 1.0, "seed": seed,
                "messages": [{"role": "user", "content": "Answer in JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": SCHEMAS[k],
                                                                           "strict": True}}}
        r = httpx.post(demo.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return k, r.json()["choices"][0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    valid = 0
    for k, choice in results:
        value = json.loads(choice["message"]["content"])
        jsonschema.validate(value, SCHEMAS[k], format_checker=jsonschema.FormatChecker())
        assert choice["finish_reason"] == "stop"
        valid += 1
    assert valid == 100


def test_json_object_and_guided_fields_on_completions(demo):
    post = lambda body: demo.post("/v1/completions", {"model": PROFILE_MODEL, "prompt": "x = ", "max_tokens": 60,
                                                      "seed": 1, "temperature": 1.0, **body})
    # any object: nothing bounds its keys and strings, so a choice may run out of tokens; one that stops is whole
    r = post({"response_format": {"type": "json_object"}, "n": 4, "max_tokens": 100})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["text"].startswith("{")
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(c["text"]), dict)
    r = post({"guided_regex": "[0-9]{3}-[a-z]{2}", "n": 3})
    assert all(__import__("re").fullmatch("[0-9]{3}-[a-z]{2}", c["text"]) for c in r.json()["choices"]), r.text
    r = post({"guided_choice": ["yes", "no", "maybe not"], "n": 4})
    assert {c["text"] for c in r.json()["choices"]} <= {"yes", "no", "maybe not"}, r.text
    r = post({"guided_grammar": 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/', "max_tokens": 12})
    text = r.json()["choices"][0]["text"]
    assert __import__("re").fullmatch(r"\([1-9](\+[1-9])*\)?", text) or r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body,param,word", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}}, "response_format",
     "look-around"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}},
     "response_format", "/$defs/nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"guided_regex": "a("}, "guided_regex", "unclosed group"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "only one"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}], "tool_choice": "required"}, "tool_choice", "strin"),
    ({"functions": [{"name": "f"}]}, "functions", "functions"),
])
def test_refused_schemas_and_tool_settings_get_a_400_naming_the_part(demo, body, param, word):
    r = demo.post("/v1/chat/completions", {"model": PROFILE_MODEL, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == param and word in err["message"], err


def test_sdk_tool_calls_streaming_and_not(demo):
    client = _openai(demo)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=PROFILE_MODEL, messages=msgs, tools=[WEATHER, SEARCH],
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=100, seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    _check_call(choice.message.tool_calls[0])
    assert choice.message.content is None
    # streamed, a named function: the call arrives as a delta with its id, name and arguments
    stream = client.chat.completions.create(model=PROFILE_MODEL, messages=msgs, tools=[WEATHER, SEARCH],
                                            tool_choice={"type": "function", "function": {"name": "search"}},
                                            max_tokens=100, seed=6, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                cur = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                cur["id"] = d.id or cur["id"]
                cur["name"] += d.function.name or ""
                cur["arguments"] += d.function.arguments or ""
            assert not (c.delta.content or "").strip(), c.delta
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "search" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), SEARCH["function"]["parameters"])


def test_tool_loop_with_results_and_auto_choice(demo):
    """call -> tool result -> answer: the second turn carries the assistant's tool_calls and a tool message."""
    client = _openai(demo)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model=PROFILE_MODEL, messages=msgs, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=80, seed=1)
    call = first.choices[0].message.tool_calls[0]
    msgs += [first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": -3})}]
    second = client.chat.completions.create(model=PROFILE_MODEL, messages=msgs, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8, seed=1)
    assert second.choices[0].message.tool_calls in (None, []) and second.choices[0].message.content
    prompt = demo.post("/tokenize", {"model": "emo-demo", "prompt": "x"})  # the endpoint is up; tokens counted below
    assert prompt.status_code == 200
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_sdk_responses_create_and_stream(demo):
    client = _openai(demo)
    tools = [{"type": "function", **WEATHER["function"]}]
    r = client.responses.create(model=PROFILE_MODEL, input="Weather in Rome?", tools=tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=100, store=False)
    assert r.status == "completed" and [o.type for o in r.output] == ["function_call"], r.output
    call = r.output[0]
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    # the call's result sent back as items: the model answers in text (cut at max_output_tokens: incomplete)
    r2 = client.responses.create(model=PROFILE_MODEL, instructions="Be brief.", max_output_tokens=6, input=[
        {"role": "user", "content": "Weather in Rome?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}])
    assert r2.status == "incomplete" and r2.incomplete_details.reason == "max_output_tokens"
    assert r2.output_text and r2.usage.output_tokens == 6
    # streamed, with a pydantic text format: typed events, and the SDK's parsed result
    with client.responses.stream(model=PROFILE_MODEL, input="A person?", text_format=Person,
                                 max_output_tokens=120) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and isinstance(final.output_parsed, Person)


@pytest.mark.parametrize("body,param", [({"store": True}, "store"), ({"previous_response_id": "resp_1"},
                                                                    "previous_response_id"),
                                        ({"background": True}, "background"), ({"input": []}, "input"),
                                        ({"input": [{"type": "mystery"}]}, "input")])
def test_responses_refuses_what_it_cannot_do_by_name(demo, body, param):
    r = demo.post("/v1/responses", {"model": PROFILE_MODEL, "input": "hi", **body})
    assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == param, r.text
