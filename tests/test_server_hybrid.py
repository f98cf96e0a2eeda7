"""emo-serve over Qwen3.5-MoE (the published multimodal layout, text served): a
transformers-written checkpoint and a profile built by emo-subset, served per request.
Concurrent requests share the engine's slots and ragged batches, whose linear-attention
layers keep a recurrent state per slot: every answer equals the model core's greedy
continuation of its pool; chat goes through the checkpoint's own template."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from modeling import ProfileManifest, load_model
from tests.checkpoints import write_domain_corpus, write_tokenizer
from tests.families_hybrid import write_hybrid_checkpoint
from tests.test_server import Server, emo_subset

pytest.importorskip("transformers")

PROMPTS = ["def add(a, b):", "The quick brown fox", "class Point:\n    def", "Once upon a time there was"]


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-qwen35")
    base = root / "tiny-qwen35"
    write_hybrid_checkpoint(base, "qwen3_5_moe", seed=31)
    write_tokenizer(base, 300)
    corpus = write_domain_corpus(root / "corpus.jsonl")
    emo_subset("build", base, "--out", root / "code", "--name", "code", "-q", "--corpus", corpus, "--domain", "code",
               "--keep", "4", timeout=120)
    server = Server(["--model", str(base), "--profile", str(root / "code"), "--served-model-name", "tiny-qwen35",
                     "--max-batch", "4"], root / "server.log").wait()
    try:
        yield {"root": root, "base": base, "server": server}
    finally:
        server.stop()


def _greedy(model, ids: list[int], n: int, pool) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(model.logits(ids + out, pool=pool)[-1].argmax()))
    return out


@pytest.mark.parametrize("profile", ["code", "full"])
def test_concurrent_completions_equal_the_core(qwen35, profile):
    model = load_model(qwen35["base"])
    pool = None if profile == "full" else ProfileManifest.read(qwen35["root"] / profile).pool()
    s = qwen35["server"]

    def ask(prompt: str) -> dict:
        r = s.post("/v1/completions", {"model": "tiny-qwen35", "profile": profile, "prompt": prompt,
                                       "max_tokens": 6, "temperature": 0, "logprobs": 1})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(PROMPTS)) as ex:  # in flight together: several slots, one batch
        bodies = list(ex.map(ask, PROMPTS))
    for prompt, body in zip(PROMPTS, bodies):
        ids = model.tokenizer.encode(prompt)
        want = _greedy(model, ids, len(body["choices"][0]["logprobs"]["tokens"]), pool)
        assert body["choices"][0]["text"] == model.tokenizer.decode(want)
        assert body["profile"] == profile


def test_chat_uses_the_checkpoints_template(qwen35):
    model = load_model(qwen35["base"])
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    r = qwen35["server"].post("/v1/chat/completions", {"model": "tiny-qwen35", "messages": messages,
                                                         "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))
    assert body["usage"]["prompt_tokens"] == len(ids)
    want = _greedy(model, ids, body["usage"]["completion_tokens"], None)
    assert body["choices"][0]["message"]["content"] == model.tokenizer.decode(want)


def test_auto_and_routing_over_the_hybrid_layers(qwen35):
    """`auto` picks a hosted profile; /v1/routing reports, per MoE layer (linear-attention layers
    included), the experts the forward chose under the profile: the core's chosen experts."""
    s = qwen35["server"]
    r = s.post("/v1/completions", {"model": "tiny-qwen35:auto", "prompt": "def add(a, b):", "max_tokens": 2,
                                   "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["profile"] in ("code", "full")
    r = s.post("/v1/routing", {"model": "tiny-qwen35", "profile": "code", "prompt": "def add(a, b):"})
    assert r.status_code == 200, r.text
    body = r.json()
    model = load_model(qwen35["base"])
    pool = ProfileManifest.read(qwen35["root"] / "code").pool()
    routes = model.routes(body["token_ids"], pool).routes
    assert [entry["layer"] for entry in body["layers"]] == [0, 1, 2, 3]
    for entry in body["layers"]:
        chosen = routes[entry["layer"]]
        want = {tuple(sorted(zip(e.tolist(), w.tolist()))) for e, w in zip(chosen.experts, chosen.weights)}
        got = {tuple(sorted(zip(e, w))) for e, w in zip(entry["experts"], entry["weights"])}
        assert {tuple(x for x, _ in t) for t in got} == {tuple(x for x, _ in t) for t in want}
        assert all(set(row) <= set(pool[entry["layer"]]) for row in entry["experts"])  # only the profile's
