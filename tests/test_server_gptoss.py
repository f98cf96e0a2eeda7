"""emo-serve over gpt-oss: an MXFP4 checkpoint (experts as the hub stores them) and a
profile built by emo-subset, served per request, chat through the model's own template
(`chat_template.jinja`, as gpt-oss's repositories keep it); the numbers equal the core's."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from modeling import ProfileManifest, SamplingParams, load_model
from tests.families import write_hf_checkpoint
from tests.test_gptoss import to_mxfp4
from tests.test_server import ROOT, Server, _env
from tests.test_server_families import serve_domain_profiles

pytest.importorskip("transformers")

# A harmony-shaped template: a dated system message, messages framed by <|start|>role<|message|>..<|end|>
HARMONY = ("{%- set today = strftime_now('%Y-%m-%d') -%}"
           "<|start|>system<|message|>Current date: {{ today }}<|end|>"
           "{%- for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{%- endfor -%}"
           "{%- if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-gptoss")
    write_hf_checkpoint(root / "float", "gpt_oss", seed=31, intermediate_size=32, max_position_embeddings=512)
    base = root / "tiny-gptoss"
    to_mxfp4(root / "float", base)
    (base / "chat_template.jinja").write_text(HARMONY)
    yield from serve_domain_profiles(root, base, "tiny-gptoss", 4, domains=("code",))


@pytest.mark.parametrize("profile", ["code", "full"])
def test_prompt_logprobs_equal_the_core(gptoss, profile):
    model = load_model(gptoss["base"])
    pool = None if profile == "full" else ProfileManifest.read(gptoss["root"] / profile).pool()
    text = "def add(a, b):\n    return a + b  # long enough to slide past the window"
    r = gptoss["server"].post("/v1/completions", {"model": "tiny-gptoss", "profile": profile, "prompt": text,
                                                  "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    assert r.json()["profile"] == profile
    ids = model.tokenizer.encode(text)
    assert len(ids) > 8
    ref = torch.log_softmax(model.logits(ids, pool=pool), -1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_chat_uses_the_models_template_and_decodes_as_the_core(gptoss):
    model = load_model(gptoss["base"])
    pool = ProfileManifest.read(gptoss["root"] / "code").pool()
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    r = gptoss["server"].post("/v1/chat/completions", {"model": "tiny-gptoss:code", "messages": messages,
                                                       "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = model.tokenizer.apply_chat_template(messages)
    assert prompt.startswith("<|start|>system<|message|>Current date: 20") and prompt.endswith("<|start|>assistant")
    assert body["usage"]["prompt_tokens"] == len(model.tokenizer.encode(prompt))
    want = model.generate(prompt, SamplingParams(max_tokens=12, temperature=0), pool=pool)
    assert body["choices"][0]["message"]["content"] == want.text and body["profile"] == "code"


def test_mxfp4_cache_serves_the_same_tokens(gptoss):
    """--mxfp4-cache keeps dequantized experts between steps: the same greedy tokens as the
    uncached server (a cache hit returns the very values a fresh dequantization would)."""
    body = {"model": "tiny-gptoss", "profile": "code", "prompt": "def add(a, b):", "max_tokens": 10,
            "temperature": 0, "logprobs": 1}
    want = gptoss["server"].post("/v1/completions", body)
    assert want.status_code == 200, want.text
    cached = Server(["--model", str(gptoss["base"]), "--profile", str(gptoss["root"] / "code"),
                     "--served-model-name", "tiny-gptoss", "--mxfp4-cache", "64MiB", "--log-level", "info"],
                    gptoss["root"] / "cached.log").wait()
    try:
        got = cached.post("/v1/completions", body)
        assert got.status_code == 200, got.text
        w, g = want.json()["choices"][0], got.json()["choices"][0]
        assert g["text"] == w["text"]
        assert max(abs(a - b) for a, b in zip(g["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"])) < 1e-6
    finally:
        cached.stop()
    assert "MXFP4 dequantized-expert cache up to 0.06 GiB" in (gptoss["root"] / "cached.log").read_text()


@pytest.mark.parametrize("size", ["lots", "-1GB", "6 parsecs"])
def test_bad_mxfp4_cache_size_is_a_usage_error(gptoss, size):
    p = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(gptoss["base"]), f"--mxfp4-cache={size}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--mxfp4-cache" in p.stderr and "is not a size" in p.stderr, p.stderr


def test_sizes_take_si_iec_and_kubernetes_units():
    from server.cli import parse_size

    assert parse_size("0") == 0 and parse_size("1e9") == 10 ** 9 and parse_size("512MB") == 512 * 10 ** 6
    assert parse_size("6GiB") == parse_size("6Gi") == 6 * 2 ** 30 and parse_size("1.5 g") == 15 * 10 ** 8
