"""Integration tests of emo-serve: real server processes on 127.0.0.1 over a tiny
checkpoint and two profiles built by `emo-subset`, driven with httpx and the
`openai` SDK (issue 5, "Show")."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import struct
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.checkpoints import CODE_DOCS, PROSE_DOCS, emo_config, write_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key-123"

PROMPTS = ["def add(a, b):", "The quick brown fox", "class Point:", "A licence grants", "int main(void) {",
           "12 + 30 = 42;", "    return a", "jumps over the", "#include <stdio.h>", "7 * 6 = ", "self.x = x",
           "permission to copy", "printf(", "The lazy dog", "def __init__(self", "100 - 58"]


# -- fixtures --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # servers under test run with emo-serve's own default
        env.pop(var, None)
    return env


# emo-subset as a child process (its exit status kept: main() returns it)
EMO_SUBSET = [sys.executable, "-c", "from subsetting.cli import main; raise SystemExit(main())"]


def _emo_subset(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*EMO_SUBSET, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def emo_subset(*args, env: dict | None = None, timeout: float = 300) -> None:
    """Run emo-subset to the end; a failure fails the test with the command's output."""
    p = subprocess.run([*EMO_SUBSET, *map(str, args)], cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"emo-subset {args[0]} failed:\n{p.stdout}{p.stderr}"


class Server:
    def __init__(self, args: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(self.port), "--threads", "1",
                                      "--log-level", "warning", *args], cwd=ROOT, env=_env(),
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 60.0) -> "Server":
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)


TINY = "tiny-emo"  # --served-model-name of the shared tiny server (tiny_server)


def tiny_server(ckpt, log_name: str):
    """A started server on the session's tiny EMO checkpoint and its code / prose profiles (the `ckpt`
    fixture), served as TINY, logging to `log_name` under the checkpoint root; a generator for
    module-scoped fixtures: `yield from tiny_server(ckpt, "x.log")`."""
    s = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--profile", str(ckpt["prose"]),
                "--served-model-name", TINY, "--log-level", "info"], ckpt["root"] / log_name)
    try:
        yield s.wait()
    finally:
        s.stop()


def complete_tiny(s: Server, **body) -> httpx.Response:
    """A short completion on the tiny server, fields of `body` overriding."""
    return s.post("/v1/completions", {"model": TINY, "prompt": "def add(a, b):", "max_tokens": 8, **body})


@pytest.fixture(scope="session")
def servers(ckpt):
    root = ckpt["root"]
    main = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--profile", str(ckpt["prose"]),
                   "--profile", f"listed={ckpt['listed']}", "--served-model-name", "tiny-emo",
                   "--auto-rule", "centroid"], root / "main.log")
    alone = Server(["--profile", str(ckpt["code"]), "--served-model-name", "tiny-emo"], root / "alone.log")
    keyed = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--api-key", KEY,
                    "--api-key", "second-key", "--max-batch", "1", "--max-queue", "1"], root / "keyed.log")
    started = [main, alone, keyed]
    try:
        for s in started:
            s.wait()
        yield {"main": main, "alone": alone, "keyed": keyed}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="session")
def core(ckpt):
    """The model core over the same files, for reference numbers."""
    from modeling import ProfileManifest, load_model

    model = load_model(ckpt["base"])
    pools = {n: ProfileManifest.read(ckpt[n]).pool() for n in ("code", "prose")}
    return model, pools


def _openai(server: Server, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _greedy(server: Server, prompt, profile=None, max_tokens=12, model="tiny-emo", **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    if profile is not None:
        body["profile"] = profile
    r = server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


# -- surface ---------------------------------------------------------------------------

def test_health_models_profiles(servers, ckpt):
    s = servers["main"]
    h = s.get("/health").json()
    assert h["status"] == "ok" and set(h["profiles"]) == {"code", "prose", "listed"}
    ids = {m["id"] for m in s.get("/v1/models").json()["data"]}
    assert {"tiny-emo", "tiny-emo:code", "tiny-emo:prose", "tiny-emo:listed", "tiny-emo:auto"} <= ids
    _greedy(s, "def add", "code", max_tokens=2)  # touch the code profile's experts
    p = s.get("/v1/profiles").json()
    by = {d["name"]: d for d in p["data"]}
    assert set(by) == {"code", "prose", "listed", "full"}
    code = by["code"]
    assert code["experts_per_layer"] == {"0": 4, "1": 4, "2": 4}
    assert by["listed"]["experts_per_layer"] == {"0": 3, "1": 3, "2": 3}
    assert by["full"]["experts_per_layer"] == {"0": 8, "1": 8, "2": 8}
    assert code["bytes"]["experts"] == 12 * 3 * 16 * 32 * 4
    assert code["coverage"] and 0 < code["mean_coverage"] <= 1
    assert code["resident"] is True and code["resident_bytes"] > 0
    assert code["has_centroid"] and code["selection"]["method"]
    m = s.get("/metrics")
    assert m.status_code == 200 and "text/plain" in m.headers["content-type"]
    for name in ("emo_queue_depth", "emo_running_requests", "emo_requests_total", "emo_generated_tokens_total",
                 "emo_prompt_tokens_total", "emo_time_to_first_token_seconds", "emo_request_latency_seconds",
                 "emo_profile_resident_bytes"):
        assert name in m.text
    assert 'emo_requests_total{profile="code",status="ok"}' in m.text


def test_default_bind_is_loopback():
    from server.cli import parse_args

    a = parse_args([])
    assert a.host == "127.0.0.1" and a.port == 8000 and a.model is None


def test_openai_sdk_completion_and_stream(servers):
    s = servers["main"]
    client = _openai(s)
    r = client.completions.create(model="tiny-emo:code", prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 10
    assert r.model_extra["profile"] == "code" and r.model == "tiny-emo:code"
    text = r.choices[0].text
    pieces, finish = [], None
    for chunk in client.completions.create(model="tiny-emo", prompt="def add(a, b):", max_tokens=10, temperature=0,
                                           stream=True, extra_body={"profile": "code"}):
        assert chunk.model_extra["profile"] == "code"
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == "length"
    # raw SSE: each event is `data: {...}`, the last is `data: [DONE]`
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"prompt": "The quick", "max_tokens": 4, "stream": True, "temperature": 0,
                            "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 4


def test_chat_completion(servers):
    client = _openai(servers["main"])
    r = client.chat.completions.create(model="tiny-emo:prose", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.model_extra["profile"] == "prose"
    assert r.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(model="tiny-emo:prose", max_tokens=5, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": "Hello"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


# -- numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("profile,max_tokens", [("code", 1), ("prose", 0), ("full", 1)])
def test_prompt_logprobs_equal_core(servers, core, profile, max_tokens):
    model, pools = core
    text = "def add(a, b):\n    return a + b"
    body = _greedy(servers["main"], text, profile, max_tokens=max_tokens, echo=True, logprobs=2)
    ch = body["choices"][0]
    assert body["profile"] == profile and ch["text"].startswith(text)
    ids = model.tokenizer.encode(text)
    lp = ch["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert "".join(lp["tokens"][:len(ids)]) == text and lp["text_offset"][1] == len(lp["tokens"][0])
    ref = torch.log_softmax(model.logits(ids, pool=pools.get(profile)), -1)
    want = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    got = lp["token_logprobs"][1:len(ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_profile_text_equals_standalone_profile_server(servers):
    for prompt in PROMPTS[:4]:
        a = _greedy(servers["main"], prompt, "code", max_tokens=16)
        b = _greedy(servers["alone"], prompt, None, max_tokens=16)
        assert b["profile"] == "full"
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        c = _greedy(servers["alone"], prompt, "code", max_tokens=16)
        assert c["choices"][0]["text"] == a["choices"][0]["text"]


def test_16_concurrent_equal_sequential(servers):
    s = servers["main"]
    profiles = ["code", "prose", "full", "listed"]
    jobs = [(p, profiles[i % 4]) for i, p in enumerate(PROMPTS)]
    one_by_one = [_greedy(s, p, prof, max_tokens=16, ignore_eos=True)["choices"][0]["text"] for p, prof in jobs]
    with cf.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda j: _greedy(s, j[0], j[1], max_tokens=16, ignore_eos=True)["choices"][0]["text"],
                               jobs))
    assert together == one_by_one


def test_sampling_seed_n_stop(servers):
    s = servers["main"]
    body = {"prompt": "The quick", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7, "n": 3}
    a, b = s.post("/v1/completions", body).json(), s.post("/v1/completions", body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len(a["choices"]) == 3 and a["usage"]["completion_tokens"] <= 24
    full = _greedy(s, "The quick", "code", max_tokens=12, ignore_eos=True)["choices"][0]["text"]
    stop = full[3:5]
    assert stop
    cut = _greedy(s, "The quick", "code", max_tokens=12, ignore_eos=True, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.index(stop)]
    # the same in a stream: nothing past the stop string is ever sent
    body = {"prompt": "The quick", "profile": "code", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stop": stop, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == cut["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_auto_profile_nearest_centroid(servers, ckpt):
    from modeling import ProfileManifest, load_model

    model = load_model(ckpt["base"])
    for n in ("code", "prose"):
        model.add_experts_from(ckpt[n])
    cents = {n: ProfileManifest.read(ckpt[n]).centroid for n in ("code", "prose")}
    for prompt in (CODE_DOCS[0], PROSE_DOCS[0]):
        ids = model.tokenizer.encode(prompt)
        probs = model.router_probs(ids)
        v = torch.cat([p.mean(0) for p in probs])

        def cos(c):
            w = torch.tensor([x for layer in c for x in layer], dtype=torch.float32)
            return float(v @ w / (v.norm() * w.norm()))

        want = max(cents, key=lambda n: cos(cents[n]))
        body = _greedy(servers["main"], prompt, "auto", max_tokens=2)
        assert body["profile"] == want and body["model"] == f"tiny-emo:{want}"


# -- bad input ---------------------------------------------------------------------------

BAD = [
    # (name, raw body or json, status, words the message must name)
    ("malformed json", b'{"prompt": "hi", ', 400, "JSON"),
    ("json list body", b'[{"prompt": "hi"}]', 400, "object"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe hi"}', 400, "UTF-8"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("string max_tokens", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("non-numeric temperature", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("negative temperature", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("top_p above 1", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("token id outside vocab", {"prompt": [5, 6, 100000]}, 400, "vocabulary"),
    ("negative token id", {"prompt": [[5, -1]]}, 400, "vocabulary"),
    ("prompt longer than context", {"prompt": [5] * 200}, 400, "context"),
    ("huge n", {"prompt": "hi", "n": 1000}, 400, "n"),
    ("huge logprobs", {"prompt": "hi", "logprobs": 1000}, 400, "logprobs"),
    ("stop wrong type", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("stop list of numbers", {"prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("missing prompt", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("prompt wrong type", {"prompt": {"a": 1}}, 400, "prompt"),
    ("unknown profile", {"prompt": "hi", "profile": "medicine"}, 404, "medicine"),
    ("unknown model", {"prompt": "hi", "model": "gpt-4"}, 404, "gpt-4"),
    ("unknown model profile", {"prompt": "hi", "model": "tiny-emo:nope"}, 404, "nope"),
    ("profile as a path", {"prompt": "hi", "profile": "../../etc/passwd"}, 400, "profile"),
    ("profile as absolute path", {"prompt": "hi", "model": "tiny-emo:/tmp/x"}, 400, "profile"),
    ("conflicting profiles", {"prompt": "hi", "model": "tiny-emo:code", "profile": "prose"}, 400, "profile"),
]


@pytest.mark.parametrize("name,body,status,word", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_json(servers, name, body, status, word):
    s = servers["main"]
    if isinstance(body, bytes):
        r = httpx.post(s.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=30)
    else:
        r = s.post("/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert word.lower() in err["message"].lower(), err


def test_bad_input_more_and_still_serving(servers):
    s = servers["main"]
    r = httpx.post(s.url + "/v1/completions", content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = s.post("/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = s.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    assert s.get("/v1/nothing").status_code == 404 and "error" in s.get("/v1/nothing").json()
    r = httpx.get(s.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    # the SDK sees these as typed errors
    import openai

    client = _openai(s)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-emo:nope", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-emo", prompt="hi", max_tokens=1, top_p=2.0)
    assert s.get("/health").json()["status"] == "ok"
    assert _greedy(s, "def add", "code", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_api_keys(servers):
    s = servers["keyed"]
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        r = s.post("/v1/completions", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    assert s.get("/v1/models").status_code == 401
    assert s.get("/metrics").status_code == 401  # /metrics follows the key (--public-metrics opens it)
    assert s.get("/health").status_code == 200  # /health stays open for probes
    for key in (KEY, "second-key"):
        assert s.post("/v1/completions", body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        _openai(s, "nope").completions.create(model="tiny-emo", prompt="hi", max_tokens=1)


def test_queue_full_gets_429(servers):
    s = servers["keyed"]  # --max-batch 1 --max-queue 1
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": [5] * 8, "max_tokens": 110, "ignore_eos": True, "temperature": 0}
    with cf.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(s.post, "/v1/completions", body, headers=h) for _ in range(6)]
        codes = [f.result().status_code for f in futs]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    r = next(f.result() for f in futs if f.result().status_code == 429)
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers=h).status_code == 200


def test_disconnect_cancels(servers):
    s = servers["keyed"]
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "hi", "max_tokens": 120, "ignore_eos": True, "stream": True, "temperature": 0}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=h, timeout=30) as resp:
        next(resp.iter_lines())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = s.get("/metrics", headers=h).text  # /metrics follows the key
        if 'status="cancelled"' in m:
            break
        time.sleep(0.05)
    assert 'emo_requests_total{profile="full",status="cancelled"} 1.0' in m
    assert s.get("/health").json()["running"] == 0


def test_startup_errors(ckpt, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"0": [99]}))
    cases = [(["--model", str(tmp_path / "missing")], "missing"), (["--profile", str(tmp_path)], "profile.json"),
             (["--model", str(ckpt["base"]), "--profile", f"bad={tmp_path / 'bad.json'}"], "99")]
    procs = [subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(_free_port()), *args], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, _ in cases]
    for p, (_, word) in zip(procs, cases):
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0 and word in err, err


def test_shared_experts_exist_once(ckpt):
    """Two profiles of one base: an expert both keep is mapped once (from the first
    profile's shard), each profile's own experts come from its own shard."""
    from modeling import ProfileManifest
    from server.config import ServerConfig
    from server.registry import Registry

    reg = Registry.from_config(ServerConfig(profiles=[str(ckpt["code"]), str(ckpt["prose"])]))
    pools = {n: ProfileManifest.read(ckpt[n]).pool() for n in ("code", "prose")}
    d = reg.describe(with_residency=False)
    union = sum(len(set(pools["code"][i]) | set(pools["prose"][i])) for i in range(3))
    assert d["loaded_expert_bytes"] == d["profiles_union_expert_bytes"] == union * 3 * 16 * 32 * 4
    for i in range(3):
        le = reg.model.layer_experts(i)
        assert le.ids == sorted(set(pools["code"][i]) | set(pools["prose"][i]))
        for e in le.ids:
            src = Path(le.sources[le.slot_of(e)]).name
            assert src == ("code" if e in pools["code"][i] else "prose")


def test_request_timeout_gets_504_and_frees_the_slot(ckpt):
    root = ckpt["root"]
    s = Server(["--model", str(ckpt["base"]), "--request-timeout", "0.3", "--max-batch", "1"], root / "timeout.log")
    try:
        s.wait()
        # 8 sequences of 115 tokens through one cache slot run one after another:
        # well past 0.3 s on any machine (ignore_eos: none can end early)
        t0 = time.monotonic()
        r = s.post("/v1/completions", {"prompt": [5] * 8, "max_tokens": 115, "n": 8, "ignore_eos": True,
                                       "temperature": 0})
        assert r.status_code == 504, r.text
        assert time.monotonic() - t0 < 30
        err = r.json()["error"]
        assert err["type"] == "timeout" and "time limit" in err["message"]
        # the only cache slot was given back: a short request is served
        ok = s.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 1, "temperature": 0})
        assert ok.status_code == 200, ok.text
    finally:
        s.stop()


def _present_bytes_per_tensor(pid: int, path: Path) -> dict[str, int]:
    """Bytes of each tensor of a .safetensors file that the process `pid` has
    mapped in memory (page-present bits of /proc/PID/pagemap; root only)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    start = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path) and int(parts[2], 16) == 0:
            start = int(parts[0].split("-")[0], 16)
    assert start is not None, f"{path} is not mapped by {pid}"
    page = 4096
    out = {}
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for name, meta in header.items():
            a, b = (8 + n + x for x in meta["data_offsets"])
            present = 0
            for vp in range((start + a) // page, (start + b + page - 1) // page):
                pm.seek(vp * 8)
                present += (struct.unpack("<Q", pm.read(8))[0] >> 63) & 1
            out[name] = min(present * page, b - a)
    return out


def test_listed_profile_touches_only_its_experts(tmp_path):
    if not os.access("/proc/self/pagemap", os.R_OK) or os.geteuid() != 0:
        pytest.skip("reading page-present bits needs root")
    # experts large enough to span many pages: 3 x 64 x 2048 x 4 bytes = 1.5 MiB each
    cfg = emo_config(hidden_size=64, intermediate_size=2048, num_experts=8, num_hidden_layers=2, head_dim=16)
    base = write_checkpoint_dir(tmp_path / "wide", cfg)
    pool = {0: [1, 7], 1: [4, 7]}
    (tmp_path / "pool.json").write_text(json.dumps(pool))
    s = Server(["--model", str(base), "--profile", f"two={tmp_path / 'pool.json'}"], tmp_path / "wide.log")
    try:
        s.wait()
        r = s.post("/v1/completions", {"prompt": "def add(a, b):\n    return a + b", "profile": "two",
                                       "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        present = _present_bytes_per_tensor(s.proc.pid, (base / "model.safetensors").resolve())
    finally:
        s.stop()
    for i in range(2):
        for j in range(8):
            names = [f"model.layers.{i}.mlp.experts.{j}.{p}_proj.weight" for p in ("gate", "up", "down")]
            got = sum(present[n] for n in names)
            if j in pool[i]:
                assert got == 3 * 64 * 2048 * 4, (i, j, got)  # read in full
            else:
                # never computed: at most the edge of a page-cache folio shared with a
                # neighbouring tensor is mapped by the kernel, never the expert itself
                assert got < 64 * 2048 * 4, (i, j, got)
