"""Schema fuzzing (issue 12, "Show"): schemathesis generates requests, valid and
not, from the OpenAPI document the server serves at /openapi.json, and sends
them to a real emo-serve process. No answer may be a 5xx. Bounded: a few dozen
examples per operation, short generations, a request timeout."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.test_server import Server


@pytest.fixture(scope="module")
def fuzz_server(ckpt):
    s = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--served-model-name", "tiny-emo",
                "--request-timeout", "20", "--max-n", "4", "--max-queue", "64"], ckpt["root"] / "fuzz.log")
    try:
        yield s.wait()
    finally:
        s.stop()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


def test_openapi_document_describes_the_bodies(fuzz_server):
    doc = fuzz_server.get("/openapi.json").json()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "temperature", "top_p", "seed", "logit_bias", "frequency_penalty"} <= set(props)
    assert {"/tokenize", "/detokenize", "/tokenizer_info", "/v1/chat/completions", "/v1/models",
            "/v1/responses"} <= set(doc["paths"])


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_for_any_generated_request(fuzz_server, mode):
    """Every operation, valid (positive) and schema-violating (negative) bodies.
    (schemathesis's own pytest plugin does not run under this pytest; its
    hypothesis strategies are used directly.)"""
    api = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    seen: dict[str, list[int]] = {}
    for result in api.get_all_operations():
        op = result.ok()
        if mode is GenerationMode.NEGATIVE and not list(op.body):
            continue  # nothing to violate in a GET without parameters

        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(timeout=30)
            seen.setdefault(op.label, []).append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        run()
    assert len(seen) >= (8 if mode is GenerationMode.POSITIVE else 4), seen
    assert all(code < 500 for codes in seen.values() for code in codes), seen
