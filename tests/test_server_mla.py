"""emo-serve over an MLA family: a DeepSeek-V3 checkpoint written by transformers (latent cache,
group-limited sigmoid routing, shared-expert MLP) and two profiles built by emo-subset, served by a
real server process: named, full and auto requests, and /v1/routing, against the model core."""

from __future__ import annotations

import pytest
import torch

from modeling import Batch, ProfileManifest, SamplingParams, load_model
from tests.test_server_families import serve_family

pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    yield from serve_family(tmp_path_factory, "deepseek_v3", "tiny-ds", 6, seed=23)  # top-3 of one of 2 groups: 3 each


@pytest.mark.parametrize("profile", ["code", "full"])
def test_prompt_logprobs_through_the_latent_cache_equal_the_core(ds, profile):
    model = load_model(ds["base"])
    pool = None if profile == "full" else ProfileManifest.read(ds["root"] / profile).pool()
    r = ds["server"].post("/v1/completions", {"model": "tiny-ds", "profile": profile, "prompt": TEXT, "max_tokens": 3,
                                              "temperature": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = model.tokenizer.encode(TEXT)
    ref = torch.log_softmax(model.logits(ids, pool=pool), -1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    got = body["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    # the greedy continuation decoded through the server's latent cache is the core's
    out = model.generate(TEXT, SamplingParams(max_tokens=3, temperature=0), pool=pool)
    assert body["choices"][0]["text"] == TEXT + out.text


def test_auto_and_routing_on_mla(ds):
    s = ds["server"]
    r = s.post("/v1/completions", {"model": "tiny-ds:auto", "prompt": "class Point:", "max_tokens": 2,
                                   "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["profile"] in ("code", "prose")
    model = load_model(ds["base"])
    ids = model.tokenizer.encode(TEXT)
    pool = ProfileManifest.read(ds["root"] / "prose").pool()
    body = s.post("/v1/routing", {"prompt": ids, "profile": "prose"}).json()
    assert [layer["layer"] for layer in body["layers"]] == [1, 2]  # layer 0 is dense (first_k_dense_replace)
    routes = model.forward(Batch(torch.tensor(ids), [0], [0], [len(ids)], [model.resolve_pool(pool)]),
                           model.new_cache(1, len(ids)), "all", collect_routes=True).routes
    for layer in body["layers"]:
        want = routes[layer["layer"]]
        for t, (experts, weights) in enumerate(zip(layer["experts"], layer["weights"])):
            assert set(experts) <= set(pool[layer["layer"]])
            mine = {int(e): float(w) for e, w in zip(want.experts[t], want.weights[t]) if e >= 0}
            assert set(experts) == set(mine)
            for e, w in zip(experts, weights):
                assert abs(w - mine[e]) < 1e-5
