"""emo-serve over a non-EMO family: a Qwen3-MoE checkpoint written by transformers and two
profiles built by emo-subset, served per request (named, "full", "auto"), with metrics;
the numbers equal the model core's pool-restricted forward."""

from __future__ import annotations


import pytest
import torch

from modeling import ProfileManifest, load_model
from tests.checkpoints import write_domain_corpus, write_tokenizer
from tests.families import write_hf_checkpoint
from tests.test_server import Server, emo_subset

pytest.importorskip("transformers")


def serve_domain_profiles(root, base, served_name: str, keep: int, domains=("code", "prose")):
    """A real emo-serve on `base` hosting one profile per corpus domain, each built by emo-subset with
    `--keep keep`; yields {"root", "base", "server"} and stops the server after (a fixture body)."""
    corpus = write_domain_corpus(root / "corpus.jsonl")
    for name in domains:
        emo_subset("build", base, "--out", root / name, "--name", name, "-q", "--corpus", corpus, "--domain", name,
                   "--keep", str(keep), timeout=120)
    server = Server(["--model", str(base), *[a for name in domains for a in ("--profile", str(root / name))],
                     "--served-model-name", served_name], root / "server.log").wait()
    try:
        yield {"root": root, "base": base, "server": server}
    finally:
        server.stop()


def serve_family(tmp_path_factory, family: str, served_name: str, keep: int, seed: int):
    """`serve_domain_profiles` over a transformers-written checkpoint of `family` with a test tokenizer."""
    root = tmp_path_factory.mktemp(f"serve-{family}")
    base = root / served_name
    write_hf_checkpoint(base, family, seed=seed)
    write_tokenizer(base, 300)
    yield from serve_domain_profiles(root, base, served_name, keep)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    yield from serve_family(tmp_path_factory, "qwen3_moe", "tiny-qwen3", 4, seed=21)


def test_profiles_listed_with_routed_experts_of_moe_layers_only(qwen):
    s = qwen["server"]
    by = {d["name"]: d for d in s.get("/v1/profiles").json()["data"]}
    assert set(by) == {"code", "prose", "full"}
    assert by["code"]["experts_per_layer"] == {"0": 4, "2": 4}  # layer 1 is dense (mlp_only_layers)
    assert by["full"]["experts_per_layer"] == {"0": 8, "2": 8}
    ids = {m["id"] for m in s.get("/v1/models").json()["data"]}
    assert {"tiny-qwen3", "tiny-qwen3:code", "tiny-qwen3:prose"} <= ids


@pytest.mark.parametrize("profile", ["code", "prose", "full"])
def test_prompt_logprobs_equal_the_core(qwen, profile):
    model = load_model(qwen["base"])
    pool = None if profile == "full" else ProfileManifest.read(qwen["root"] / profile).pool()
    text = "def add(a, b):\n    return a + b"
    r = qwen["server"].post("/v1/completions", {"model": "tiny-qwen3", "profile": profile, "prompt": text,
                                                "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["profile"] == profile
    ids = model.tokenizer.encode(text)
    ref = torch.log_softmax(model.logits(ids, pool=pool), -1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    got = body["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4


def test_auto_picks_a_profile_and_metrics_count_it(qwen):
    s = qwen["server"]
    r = s.post("/v1/completions", {"model": "tiny-qwen3:auto", "prompt": "class Point:\n    def __init__(self, x, y):",
                                   "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    chosen = r.json()["profile"]
    assert chosen in ("code", "prose")
    s.post("/v1/completions", {"model": "tiny-qwen3:prose", "prompt": "The quick brown fox", "max_tokens": 2})
    m = s.get("/metrics").text
    assert 'emo_requests_total{profile="prose",status="ok"}' in m
    assert f'emo_requests_total{{profile="{chosen}",status="ok"}}' in m
