"""Issue 17: the defects a second adversarial pass found, each reproduced against
a real emo-serve (a process on 127.0.0.1 driven with httpx, or for the engine's
scheduling the same engine in this process over the same checkpoint)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server import KEY, Server, TINY, complete_tiny, tiny_server

MODEL = TINY


@pytest.fixture(scope="module")
def srv(ckpt):
    yield from tiny_server(ckpt, "adversarial.log")


# -- 1: /v1/routing passes and auto probes must not starve generation ----------------------------------

def _engine_state(ckpt, **config):
    from server.app import build_state
    from server.config import ServerConfig

    return build_state(ServerConfig(model=str(ckpt["base"]), profiles=[str(ckpt["code"]), str(ckpt["prose"])],
                                    file_leases=False, **config))


def _stall(engine, seconds: float) -> None:
    """Keep the engine thread busy in one sequence's event sink, so that work can
    pile up behind it (what many clients arriving at once look like)."""
    from modeling import SamplingParams
    from server.engine import Sequence

    entered = threading.Event()

    def sink(ev) -> None:
        if not entered.is_set():
            entered.set()
            time.sleep(seconds)

    engine.submit([Sequence([5, 6], SamplingParams(max_tokens=1), "full", sink)])
    assert entered.wait(10)


def test_routing_passes_do_not_starve_a_completion(ckpt):
    """Before: `_run_tasks` ran every queued /v1/routing pass before each step, so
    clients looping on /v1/routing held completions back for as long as they kept
    it up. Now each step runs at most one pass: a completion queued behind 24
    passes gets its tokens while most passes still wait."""
    from modeling import SamplingParams
    from server.engine import Sequence
    from server.entrypoints.openai.routing.serving import routing_body

    state = _engine_state(ckpt)
    eng = state.engine
    eng.start()
    try:
        _stall(eng, 1.0)
        ids = list(range(10, 110))
        futs = [eng.call(lambda: routing_body(state, ids, "full"), tokens=len(ids)) for _ in range(24)]
        done_at_token: list[int] = []
        finished = threading.Event()

        def sink(ev) -> None:
            if ev.tokens:
                done_at_token.append(sum(f.done() for f in futs))
            if ev.finish_reason or ev.error:
                finished.set()

        eng.submit([Sequence([7, 8, 9], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "full",
                             sink)])
        assert finished.wait(60)
        for f in futs:
            f.result(60)
    finally:
        eng.stop()
    assert len(done_at_token) == 8
    assert done_at_token[-1] <= 12, done_at_token  # before: [24, 24, ...]


def test_auto_probes_ride_between_steps(ckpt):
    """Before: every `auto` sequence admitted in a step ran its probe forward(s)
    before that step, so a burst of auto requests stalled every running stream for
    all of them at once. Now one probe runs per step and the streams advance."""
    from modeling import SamplingParams
    from server.engine import Sequence

    state = _engine_state(ckpt, auto_rule="perplexity")
    eng = state.engine
    eng.start()
    try:
        _stall(eng, 1.0)
        probed_at_token: list[int] = []
        autos: list[Sequence] = []
        done = threading.Event()
        left = [9]

        def end(ev) -> None:
            if ev.finish_reason or ev.error:
                assert ev.error is None, ev.error
                left[0] -= 1
                if not left[0]:
                    done.set()

        def stream_sink(ev) -> None:
            if ev.tokens:
                probed_at_token.append(sum(s.profile != "auto" for s in autos))
            end(ev)

        eng.submit([Sequence([7, 8, 9], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "full",
                             stream_sink)])
        autos += [Sequence(list(range(20, 100)), SamplingParams(max_tokens=1, temperature=0), "auto", end)
                  for _ in range(8)]
        eng.submit(autos)
        assert done.wait(60)
    finally:
        eng.stop()
    assert all(s.profile in ("code", "prose") for s in autos)
    # scored one profile per step, the choice is the rule's own
    assert autos[0].profile == state.registry.choose_auto(autos[0].prompt_ids, "perplexity")
    assert probed_at_token[0] <= 2, probed_at_token  # before: 8 (every probe ran before the first step)


# -- 6: control characters from the request never reach the log as they are ---------------------------

def test_control_characters_in_the_path_cannot_forge_log_lines(srv):
    forged = "2026-12-06 12:00:00,000 CRITICAL emo_serve.engine: FORGED"
    raw = f"GET /v1/models%0a{forged.replace(' ', '%20')}%0d%1b[31m HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as c:
        c.sendall(raw.encode())
        assert c.recv(100).startswith(b"HTTP/1.1 404")
    time.sleep(0.3)
    lines = srv.log.read_text().splitlines()
    assert not any(line.startswith(forged[:20]) for line in lines), lines[-3:]
    hit = [line for line in lines if "FORGED" in line]
    assert len(hit) == 1 and "emo_serve.access" in hit[0] and "\\n2026-12-06" in hit[0], hit
    assert "\x1b" not in srv.log.read_text() and "\\x1b[31m" in hit[0]


# -- 8: every route but /health and /ui needs the key, unknown ones included --------------------------

def test_openapi_and_unknown_paths_need_the_key(ckpt):
    s = Server(["--model", str(ckpt["base"]), "--api-key", KEY], ckpt["root"] / "keyed17.log")
    h = {"Authorization": f"Bearer {KEY}"}
    try:
        s.wait()
        for path in ("/openapi.json", "/nope", "/v1/nope", "/docs"):
            r = s.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
        assert s.get("/openapi.json", headers=h).status_code == 200
        assert s.get("/nope", headers=h).status_code == 404
        assert s.get("/health").status_code == 200 and s.get("/ui/").status_code == 200
        assert s.get("/ui").status_code in (200, 307)
    finally:
        s.stop()


# -- 9: /tokenizer_info answers from what was loaded at start ------------------------------------------

def test_tokenizer_info_does_not_reread_the_disk(ckpt, tmp_path):
    folder = tmp_path / "tiny-emo"
    shutil.copytree(ckpt["base"], folder)
    s = Server(["--model", str(folder)], tmp_path / "tokinfo.log")
    try:
        s.wait()
        first = s.get("/tokenizer_info")
        assert first.status_code == 200 and first.json()["eos_token"] == "<|endoftext|>"
        cfg = folder / "tokenizer_config.json"
        cfg.unlink()
        cfg.symlink_to(folder / "config.json")  # another JSON file: its keys must not be echoed
        assert s.get("/tokenizer_info").json() == first.json()
        cfg.unlink()
        cfg.write_text("not json {")
        r = s.get("/tokenizer_info")
        assert r.status_code == 200 and r.json() == first.json()
    finally:
        s.stop()


# -- 11: stop_token_ids are validated, and min_tokens wins over them -----------------------------------

@pytest.mark.parametrize("ids", [[-1], [320], [5] * 2000, [10**12]])
def test_stop_token_ids_are_validated(srv, ids):
    r = complete_tiny(srv, stop_token_ids=ids)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stop_token_ids" and err["code"] in ("invalid_token_id", "too_many_stop_token_ids")


def test_min_tokens_wins_over_stop_token_ids(srv):
    r = complete_tiny(srv, stop_token_ids=list(range(320)), min_tokens=5, max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "stop"


# -- 12: nits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [{"model": f"{MODEL}:code", "profile": "prose"}, {"min_tokens": 9},
                                  {"stop": ["x" * 300]}, {"logit_bias": {str(i): 1 for i in range(300)} | {}}])
def test_every_400_has_a_code(srv, body):
    if "logit_bias" in body:  # more than 1024 entries: the tiny model has 320 ids, so repeat them as "007"-style keys
        body = {"logit_bias": {f"{i:0{w}d}": 1 for w in (3, 4, 5, 6) for i in range(300)}}
    r = complete_tiny(srv, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"], r.text


def test_chat_top_logprobs_names_its_param(srv):
    r = srv.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "logprobs": True, "top_logprobs": 21, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


def _requests_total(s: Server, profile: str, status: str) -> float:
    for line in s.get("/metrics").text.splitlines():
        if line.startswith("emo_requests_total{") and f'profile="{profile}"' in line and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_routing_calls_are_counted(srv):
    before = _requests_total(srv, "prose", "ok"), _requests_total(srv, "prose", "400")
    assert srv.post("/v1/routing", {"model": MODEL, "profile": "prose", "prompt": "def f(x):"}).status_code == 200
    assert srv.post("/v1/routing", {"model": MODEL, "profile": "prose", "prompt": [999]}).status_code == 400
    assert (_requests_total(srv, "prose", "ok"), _requests_total(srv, "prose", "400")) == (before[0] + 1,
                                                                                       before[1] + 1)


# -- 7: /health says "verifying" until every profile has been checked --------------------------------

def test_health_says_verifying_until_checked(ckpt):
    from server.entrypoints.openai.models.serving import health

    state = _engine_state(ckpt)
    state.engine.start()
    try:
        assert health(state)["status"] == "verifying"  # nothing checked yet: requests would be served unverified
        state.registry.start_verification().join(60)
        assert health(state)["status"] == "ok"
    finally:
        state.engine.stop()


# -- 3, 4: oversized text is refused before tokenizing; memory comes back -----------------------------

BIG_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42; " * 13500  # ~800 KB


def _rss(s: Server) -> int:
    for line in Path(f"/proc/{s.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_oversized_text_is_refused_before_tokenizing(srv):
    for path, body in (("/v1/routing", {"prompt": BIG_TEXT}), ("/v1/completions", {"prompt": BIG_TEXT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG_TEXT}]})):
        r = srv.post(path, {"model": MODEL, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "before tokenizing" in err["message"], (path, err)


def test_memory_comes_back_after_refused_requests(srv):
    import concurrent.futures as cf

    def one(_):
        return httpx.post(srv.url + "/v1/completions", json={"prompt": BIG_TEXT, "max_tokens": 1}, timeout=120)

    with cf.ThreadPoolExecutor(8) as ex:
        assert all(r.status_code == 400 for r in ex.map(one, range(8)))
        start = _rss(srv)
        for _ in range(4):
            assert all(r.status_code == 400 for r in ex.map(one, range(8)))
    grown = _rss(srv) - start
    assert grown < 64 << 20, f"RSS grew by {grown / 2**20:.0f} MiB over 32 refused requests"


def test_long_texts_that_fit_are_tokenized_and_their_memory_returned(ckpt):
    """The tokenizer's own path for long texts (below the refusal bound, e.g.
    /tokenize): transients handed back after each."""
    from modeling.tokenizer import Tokenizer

    tok = Tokenizer(ckpt["base"])
    text = BIG_TEXT[:200_000]
    assert tok.min_tokens(text) <= len(tok.encode(text))
    assert tok.encode(text) == tok._tok.encode(text).ids


# -- 2: truncating a served profile's shard takes that profile out, not the server ---------------------

def _greedy_text(s: Server, profile: str) -> httpx.Response:
    return complete_tiny(s, profile=profile, temperature=0, ignore_eos=True, max_tokens=6)


@pytest.mark.parametrize("how", ["truncate", "cp"])
def test_truncating_a_served_shard_withdraws_only_that_profile(ckpt, tmp_path, how):
    """Before: the next request that touched the truncated shard's pages got
    SIGBUS (exit 135) and every profile went down. Now the server holds a read
    lease on every mapped file: the kernel tells it before another process
    truncates or opens the file for writing; it withdraws the profile (its
    expert slots served from another source, sequences on it failed) and only
    then lets the writer go on."""
    code, prose = tmp_path / "code", tmp_path / "prose"
    shutil.copytree(ckpt["code"], code)
    shutil.copytree(ckpt["prose"], prose)
    s = Server(["--model", str(ckpt["base"]), "--profile", str(code), "--profile", str(prose),
                "--served-model-name", MODEL, "--log-level", "info"], tmp_path / "lease.log")
    try:
        s.wait()
        before = {p: _greedy_text(s, p) for p in ("code", "prose", "full")}
        assert all(r.status_code == 200 for r in before.values())
        shard = code / "model.safetensors"
        if how == "truncate":
            cmd = ["truncate", "-s", str(shard.stat().st_size // 2), str(shard)]
        else:  # cp over the file truncates it first, then writes
            cmd = ["cp", str(prose / "model.safetensors"), str(shard)]
        # coreutils' truncate opens with O_NONBLOCK: while the lease is held it fails at once (EAGAIN),
        # having told the server; once the profile is withdrawn and the lease released, it succeeds
        for _ in range(40):
            if subprocess.run(cmd, timeout=60, capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            raise AssertionError(f"{cmd[0]} never got to write the file")
        for _ in range(3):  # requests that touch every profile, and the pages of the old file
            r = _greedy_text(s, "code")
            assert r.status_code == 503 and r.json()["error"]["code"] == "profile_unavailable", r.text
            for p in ("prose", "full"):
                r = _greedy_text(s, p)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == \
                    before[p].json()["choices"][0]["text"], (p, r.text)
        assert s.proc.poll() is None
        state = {p["name"]: p for p in s.get("/v1/profiles").json()["data"]}
        assert state["code"]["state"] == "failed" and "written" in " ".join(state["code"]["problems"])
        assert state["prose"]["state"] == "verified"
    finally:
        s.stop()


# -- 5: non-finite logits are an error, never a token; files are re-hashed on request -----------------

def test_non_finite_logits_are_an_error_naming_the_profile(ckpt, tmp_path):
    """Before: an expert overwritten with 0x7f bytes gave NaN logits, sampled as
    token 0 (end of text): 200, empty text, finish_reason "stop"."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tiny-emo"
    shutil.copytree(ckpt["base"], folder)
    shard = folder / "model.safetensors"
    tensors = load_file(str(shard))
    poison = torch.frombuffer(bytearray(b"\x7f" * 4), dtype=torch.float32)[0]  # 3.4e38: products overflow
    for name in tensors:
        if ".layers.0.mlp.experts." in name:
            tensors[name] = torch.full_like(tensors[name], poison)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    s = Server(["--model", str(folder), "--served-model-name", MODEL], tmp_path / "nan.log")
    try:
        s.wait()
        for stream in (False, True):
            r = complete_tiny(s, temperature=0, stream=stream)
            if not stream:
                assert r.status_code == 500, r.text
                err = r.json()["error"]
            else:
                events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                err = events[-1]["error"]
            assert err["code"] == "numerical_error" and "'full'" in err["message"], err
        assert s.get("/health").status_code == 200
    finally:
        s.stop()


def test_reverify_interval_finds_bytes_changed_behind_the_servers_back(ckpt, tmp_path):
    prose = tmp_path / "prose"
    shutil.copytree(ckpt["prose"], prose)
    from server.app import build_state
    from server.config import ServerConfig

    state = build_state(ServerConfig(model=str(ckpt["base"]), profiles=[str(ckpt["code"]), str(prose)],
                                     reverify_interval=0.2, file_leases=False))
    reg = state.registry
    reg.start_verification(state.config.reverify_interval)
    deadline = time.monotonic() + 30
    while reg.verifying() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reg.profiles["prose"].state == "verified"
    with open(prose / "model.safetensors", "r+b") as f:  # one flipped bit in the data
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 1]))
    while reg.profiles["prose"].state != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reg.profiles["prose"].state == "failed" and "sha256" in " ".join(reg.profiles["prose"].problems)
    assert reg.profiles["code"].state == "verified"


# -- 10: a profile whose shard is not a safetensors file leaves service alone --------------------------

def test_a_profile_with_a_bad_shard_is_out_of_service_not_the_server(ckpt, tmp_path):
    bad = tmp_path / "prose"
    shutil.copytree(ckpt["prose"], bad)
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(bad / "profile.json")  # a file, but not safetensors
    s = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--profile", str(bad),
                "--served-model-name", MODEL], tmp_path / "badshard.log")
    try:
        s.wait()
        r = complete_tiny(s, profile="prose")
        assert r.status_code == 503 and r.json()["error"]["code"] == "profile_unavailable", r.text
        assert complete_tiny(s, profile="code").status_code == 200 and complete_tiny(s).status_code == 200
        state = {p["name"]: p for p in s.get("/v1/profiles").json()["data"]}
        assert state["prose"]["state"] == "failed" and "safetensors" in " ".join(state["prose"]["problems"]), state
        assert s.get("/health").json()["status"] == "ok"
        for auto in range(3):  # auto never picks it
            assert complete_tiny(s, profile="auto", prompt="The quick brown fox").json()["profile"] != "prose"
    finally:
        s.stop()


def test_special_tokens_can_be_kept(srv):
    """Special-token text in a prompt becomes the control token (as in vLLM); the
    text drops special tokens unless `skip_special_tokens` is false."""
    ids = srv.post("/tokenize", {"prompt": "hi<|pad|>"}).json()["tokens"]
    assert 1 in ids  # <|pad|>
    assert srv.post("/detokenize", {"tokens": ids}).json()["prompt"] == "hi"
    assert srv.post("/detokenize", {"tokens": ids, "skip_special_tokens": False}).json()["prompt"] == "hi<|pad|>"
    body = {"logit_bias": {"1": 100}, "max_tokens": 2, "temperature": 0}
    assert complete_tiny(srv, **body).json()["choices"][0]["text"] == ""
    kept = complete_tiny(srv, **body, skip_special_tokens=False).json()
    assert kept["choices"][0]["text"] == "<|pad|><|pad|>", kept


def test_truncating_the_models_own_file_stops_serving_not_the_process(ckpt, tmp_path):
    base = tmp_path / "tiny-emo"
    shutil.copytree(ckpt["base"], base)
    s = Server(["--model", str(base), "--profile", str(ckpt["code"]), "--served-model-name", MODEL],
               tmp_path / "lease-base.log")
    try:
        s.wait()
        assert _greedy_text(s, "code").status_code == 200
        shard = base / "model.safetensors"
        cmd = ["truncate", "-s", str(shard.stat().st_size // 2), str(shard)]
        for _ in range(40):
            if subprocess.run(cmd, timeout=60, capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            raise AssertionError("truncate never got to write the file")
        for p in ("code", "full"):
            r = _greedy_text(s, p)
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable", r.text
        h = s.get("/health")
        assert h.status_code == 503 and "truncated or written" in h.json()["status"]
        assert s.proc.poll() is None
    finally:
        s.stop()
