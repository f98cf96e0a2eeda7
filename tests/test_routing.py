"""Routing made visible (issue 11): POST /v1/routing reports exactly what the
forward pass chose, `return_routing` on completions, expert-load counters at
/metrics. Real server processes on 127.0.0.1 over real checkpoints: a tiny EMO
written by safetensors, an OLMoE written by transformers, and the bundled demo
with its four shipped profiles."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from tests.checkpoints import emo_config, write_checkpoint_dir
from tests.test_server import Server

IDS = [5, 17, 42, 3, 99, 250, 7, 64, 128, 31, 2, 200, 11, 12]
EMO_POOLS = {"left": {"0": [0, 1, 2, 7], "1": [0, 3, 5, 7], "2": [1, 2, 6, 7]},
             "right": {"0": [3, 4, 5, 6, 7], "1": [1, 2, 4, 6, 7], "2": [0, 3, 4, 5, 7]}}
OLMOE_POOLS = {"left": {"0": [0, 1, 2], "1": [0, 3, 5], "2": [1, 2, 6]},
               "right": {"0": [3, 4, 5, 6, 7], "1": [1, 2, 4, 6, 7], "2": [0, 3, 4, 5, 7]}}


def _write_pools(root: Path, pools: dict) -> list[str]:
    args = []
    for name, pool in pools.items():
        f = root / f"{name}.json"
        f.write_text(json.dumps(pool))
        args += ["--profile", f"{name}={f}"]
    return args


@pytest.fixture(scope="module")
def emo(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing-emo")
    base = write_checkpoint_dir(root / "tiny-emo", emo_config())
    s = Server(["--model", str(base), "--served-model-name", "tiny-emo", *_write_pools(root, EMO_POOLS)],
               root / "server.log").wait()
    yield {"server": s, "base": base, "pools": EMO_POOLS}
    s.stop()


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    from tests.families import write_hf_checkpoint

    root = tmp_path_factory.mktemp("routing-olmoe")
    write_hf_checkpoint(root / "olmoe", "olmoe")
    s = Server(["--model", str(root / "olmoe"), "--served-model-name", "tiny-olmoe",
                "--no-expert-metrics", *_write_pools(root, OLMOE_POOLS)], root / "server.log").wait()
    yield {"server": s, "base": root / "olmoe", "pools": OLMOE_POOLS}
    s.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`emo-serve` with no arguments: the bundled demo and its shipped profiles."""
    root = tmp_path_factory.mktemp("routing-demo")
    s = Server([], root / "server.log").wait()
    yield s
    s.stop()


def _expected_top_k(model, ids: list[int], pool) -> list[list[tuple[set[int], dict[int, float], dict[int, float]]]]:
    """Per MoE layer and token, from `Model.router_probs` (the routing softmax of
    the pool-restricted forward): the top-k experts by the family's rule, as
    original ids, their weights, and every expert's probability (to tell a tie)."""
    probs = model.router_probs(ids, pool=pool)
    rule = model.config.routing
    out = []
    for i, p in enumerate(probs):
        if p is None:
            continue
        le = model.layer_experts(i)
        shared = le.shared_mask.cpu()
        n_sh = int(shared.sum())
        layer = []
        for row in p:
            routed = row.masked_fill(shared, -1.0)
            top = torch.topk(routed, rule.top_k - n_sh).indices.tolist() + shared.nonzero().flatten().tolist()
            top = [s for s in top if row[s] > 0 or shared[s]]  # a pool smaller than k
            w = {s: float(row[s]) for s in top}
            if rule.renormalise:
                tot = sum(w.values())
                w = {s: v / tot for s, v in w.items()}
            layer.append(({le.ids[s] for s in top}, {le.ids[s]: v for s, v in w.items()},
                          {e: float(v) for e, v in zip(le.ids, row)}))
        out.append(layer)
    return out


def _same_choice(experts: list[int], want, where) -> None:
    """The same experts as the model's top-k; where two experts tie exactly (bf16
    logits can), either may be chosen, so the chosen probabilities must match."""
    w_set, _, prob = want
    if set(experts) != w_set:
        got_p = sorted(prob.get(e, -1.0) for e in experts)
        want_p = sorted(prob[e] for e in w_set)
        assert got_p == pytest.approx(want_p, abs=1e-7), (where, experts, w_set)


def _check_against_core(setup, prompt_ids: list[int]) -> None:
    from modeling import load_model

    s = setup["server"]
    model = load_model(setup["base"])
    profiles = {"full": None, **{n: {int(k): v for k, v in p.items()} for n, p in setup["pools"].items()}}
    for name, pool in profiles.items():
        r = s.post("/v1/routing", {"prompt": prompt_ids, "profile": name})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["profile"] == name and body["token_ids"] == prompt_ids
        want = _expected_top_k(model, prompt_ids, pool)
        assert len(body["layers"]) == len(want)
        for got_layer, want_layer in zip(body["layers"], want):
            i = got_layer["layer"]
            assert len(got_layer["experts"]) == len(prompt_ids)
            for t, (experts, weights) in enumerate(zip(got_layer["experts"], got_layer["weights"])):
                w_set, w_weights, _ = want_layer[t]
                _same_choice(experts, want_layer[t], (name, i, t))
                if pool is not None:
                    assert set(experts) <= set(pool[i])
                for e, w in zip(experts, weights):
                    assert abs(w - w_weights[e]) < 1e-5, (name, i, t, e)
        aff = body["profile_affinity"]
        assert set(aff) == set(setup["pools"]) and all(0 <= v <= 1 for v in aff.values())
        assert len(body["token_profiles"]) == len(prompt_ids) and set(body["token_profiles"]) <= set(aff)


def test_routing_equals_model_top_k_emo(emo):
    _check_against_core(emo, IDS)


def test_routing_equals_model_top_k_olmoe(olmoe):
    _check_against_core(olmoe, IDS)
    body = olmoe["server"].post("/v1/routing", {"prompt": IDS[:3]}).json()
    assert body["tokens"] == [str(t) for t in IDS[:3]]  # no tokenizer: the ids themselves
    m = olmoe["server"].get("/metrics").text  # --no-expert-metrics
    assert "emo_expert_tokens_total" not in m


def test_profile_affinity_is_share_of_full_router_mass(emo):
    """Affinity = share of the full model's routed mass inside each pool, averaged
    over tokens and layers; the token lean is the per-token argmax."""
    from modeling import load_model

    model = load_model(emo["base"])
    probs = model.router_probs(IDS)
    per_tok = {}
    for name, pool in EMO_POOLS.items():
        acc = torch.zeros(len(IDS))
        for i, p in enumerate(probs):
            routed = ~model.layer_experts(i).shared_mask
            ids = model.layer_experts(i).ids
            inside = torch.tensor([ids[s] in pool[str(i)] for s in range(len(ids))]) & routed
            acc += (p * inside).sum(1) / (p * routed).sum(1)
        per_tok[name] = acc / len(probs)
    body = emo["server"].post("/v1/routing", {"prompt": IDS, "profile": "left"}).json()
    for name in EMO_POOLS:
        assert abs(body["profile_affinity"][name] - float(per_tok[name].mean())) < 1e-5
    lean = ["left" if a > b else "right" for a, b in zip(per_tok["left"].tolist(), per_tok["right"].tolist())]
    assert body["token_profiles"] == lean


def test_return_routing_and_expert_load_metrics(emo):
    s = emo["server"]
    before = _expert_tokens(s)
    text = "def add(a, b):"
    r = s.post("/v1/routing", {"prompt": text, "profile": "left"}).json()
    n = len(r["token_ids"])
    for extra in ({}, {"stream": True}):
        body = {"prompt": text, "profile": "left", "max_tokens": 1, "temperature": 0, "return_routing": True, **extra}
        if extra:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as resp:
                events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
            summary = events[-1]["choices"][0]["routing"]
        else:
            resp = s.post("/v1/completions", body)
            assert resp.status_code == 200, resp.text
            summary = resp.json()["choices"][0]["routing"]
        # max_tokens 1: the one forward is the prompt's prefill, the very pass /v1/routing reports
        for got, layer in zip(summary["layers"], r["layers"]):
            counts: dict[int, int] = {}
            for row in layer["experts"]:
                for e in row:
                    counts[e] = counts.get(e, 0) + 1
            assert got["layer"] == layer["layer"]
            assert dict(zip(got["experts"], got["tokens"])) == counts
            assert sum(got["tokens"]) == n * 3  # top-k 3 per token
        assert summary["profile_affinity"] == pytest.approx(r["profile_affinity"], abs=1e-5)
    chat = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                           "profile": "right", "return_routing": True})
    layers = chat.json()["choices"][0]["routing"]["layers"]
    assert all(set(x["experts"]) <= set(EMO_POOLS["right"][str(x["layer"])]) for x in layers)
    assert s.post("/v1/completions", {"prompt": text, "max_tokens": 1}).json()["choices"][0].get("routing") is None
    after = _expert_tokens(s)
    assert after[0] > before[0] and set(after[1]) == {(i, e) for i in range(3) for e in range(8)}


def _expert_tokens(s) -> tuple[float, dict]:
    series = {}
    for line in s.get("/metrics").text.splitlines():
        if line.startswith("emo_expert_tokens_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            series[(int(labels["layer"].strip('"')), int(labels["expert"].strip('"')))] = float(line.split()[-1])
    return sum(series.values()), series


# -- bad input: the same answers as completions ---------------------------------------------

BAD = [
    ("malformed json", b'{"prompt": "hi", '),
    ("json list body", b'[{"prompt": "hi"}]'),
    ("invalid utf-8", b'{"prompt": "\xff\xfe hi"}'),
    ("token id outside vocab", {"prompt": [5, 6, 100000]}),
    ("negative token id", {"prompt": [5, -1]}),
    ("prompt longer than context", {"prompt": [5] * 200}),
    ("missing prompt", {}),
    ("empty prompt", {"prompt": ""}),
    ("empty token list", {"prompt": []}),
    ("prompt wrong type", {"prompt": {"a": 1}}),
    ("unknown profile", {"prompt": "hi", "profile": "medicine"}),
    ("unknown model", {"prompt": "hi", "model": "gpt-4"}),
    ("unknown model profile", {"prompt": "hi", "model": "tiny-emo:nope"}),
    ("profile as a path", {"prompt": "hi", "profile": "../../etc/passwd"}),
    ("conflicting profiles", {"prompt": "hi", "model": "tiny-emo:left", "profile": "right"}),
]


@pytest.mark.parametrize("name,body", BAD, ids=[b[0] for b in BAD])
def test_bad_routing_input_answers_like_completions(emo, name, body):
    s = emo["server"]

    def post(path):
        if isinstance(body, bytes):
            return httpx.post(s.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        return s.post(path, body)

    want, got = post("/v1/completions"), post("/v1/routing")
    assert 400 <= want.status_code < 500
    assert got.status_code == want.status_code, got.text
    g, w = got.json()["error"], want.json()["error"]
    assert set(g) == {"message", "type", "param", "code"}
    assert (g["type"], g["param"], g["code"]) == (w["type"], w["param"], w["code"]), (g, w)


def test_routing_keys_and_limits(tmp_path):
    base = write_checkpoint_dir(tmp_path / "tiny-emo", emo_config())
    s = Server(["--model", str(base), "--api-key", "k1", "--max-body-bytes", "2000"], tmp_path / "s.log").wait()
    try:
        assert s.post("/v1/routing", {"prompt": "hi"}).status_code == 401
        assert s.post("/v1/routing", {"prompt": "hi"}, headers={"Authorization": "Bearer no"}).status_code == 401
        ok = s.post("/v1/routing", {"prompt": "hi"}, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200 and ok.json()["profile"] == "full"
        big = s.post("/v1/routing", {"prompt": "x" * 5000}, headers={"Authorization": "Bearer k1"})
        assert big.status_code == 413
        # a prompt that fills the context exactly is fine here (nothing is generated)
        r = s.post("/v1/routing", {"prompt": [5] * 128}, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200 and len(r.json()["layers"][0]["experts"]) == 128
    finally:
        s.stop()


# -- the bundled demo ----------------------------------------------------------------------

PY_PROMPT = "import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return [line.rstrip() for line in f]\n"
ARITH_PROMPT = "12 + 30 = 42\n7 * 6 = 42\n100 - 58 = 42\n81 / 9 = 9\n"


def test_bundled_demo_leans_to_the_right_profile(demo):
    for prompt, want in ((PY_PROMPT, "python"), (ARITH_PROMPT, "arith")):
        body = demo.post("/v1/routing", {"prompt": prompt}).json()
        aff = body["profile_affinity"]
        assert set(aff) == {"python", "c", "prose", "arith"}
        assert max(aff, key=aff.get) == want, aff
        assert body["token_profiles"].count(want) > len(body["token_ids"]) / 2
        auto = demo.post("/v1/completions", {"prompt": prompt, "profile": "auto", "max_tokens": 1}).json()
        assert auto["profile"] == want


def test_auto_reports_fits_and_margin_and_falls_back_to_full_below_the_threshold(demo):
    from server.config import ServerConfig
    from server.registry import Registry

    body = demo.post("/v1/routing", {"prompt": PY_PROMPT, "profile": "auto"}).json()
    auto = body["auto"]
    assert auto["rule"] == "fit" and auto["profile"] == body["profile"] == "python" and not auto["fallback"]
    fits = auto["fits"]
    assert set(fits) == {"python", "c", "prose", "arith"} and max(fits, key=fits.get) == "python"
    ranked = sorted(fits.values(), reverse=True)
    assert auto["margin"] == pytest.approx(ranked[0] - ranked[1], abs=1e-5) and auto["margin"] > 0
    # fit = affinity / the profile's mean coverage (profile.json)
    reg = Registry.from_config(ServerConfig())
    cov = reg.profiles["python"].manifest.coverage.values()
    assert fits["python"] == pytest.approx(body["profile_affinity"]["python"] / (sum(cov) / len(cov)), abs=1e-4)
    ids = reg.model.tokenizer.encode(PY_PROMPT)
    assert reg.choose_auto(ids) == "python"
    reg.auto_min_fit = ranked[0] + 0.01  # no profile fits well enough: the operator's threshold sends it to full
    d = reg.auto_decision(ids)
    assert d["profile"] == "full" and d["fallback"] and d["threshold"] == reg.auto_min_fit
    with pytest.raises(Exception, match="--auto-min-fit"):
        Registry(reg.model, "m", [], auto_min_fit=-1)


def test_bundled_demo_routing_equals_model_top_k(demo):
    from modeling import ProfileManifest, load_model
    from server.registry import BUNDLED

    model = load_model(BUNDLED)
    for d in sorted((BUNDLED / "profiles").iterdir()):
        model.add_experts_from(d)
    ids = model.tokenizer.encode(PY_PROMPT)
    for name in ("full", "python", "c", "prose", "arith"):
        pool = None if name == "full" else ProfileManifest.read(BUNDLED / "profiles" / name).pool()
        body = demo.post("/v1/routing", {"prompt": PY_PROMPT, "profile": name}).json()
        want = _expected_top_k(model, ids, pool)
        for got_layer, want_layer in zip(body["layers"], want):
            for t, experts in enumerate(got_layer["experts"]):
                _same_choice(experts, want_layer[t], (name, got_layer["layer"], t))
