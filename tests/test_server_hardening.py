"""Issue 12 (server side): each defect the adversarial pass found, reproduced
against a real emo-serve (a process on 127.0.0.1, or for the engine-thread
cases the same app under uvicorn in this process), with httpx and the openai SDK."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.test_server import KEY, ROOT, Server, TINY, _env, complete_tiny, tiny_server, _free_port, _openai

MODEL = TINY


@pytest.fixture(scope="module")
def srv(ckpt):
    yield from tiny_server(ckpt, "hardening.log")


# -- 1: no accepted value fails the engine ------------------------------------------------

def test_tiny_temperature_and_top_p_never_fail_other_requests(srv):
    """Before: temperature 1e-38 or top_p 1e-45 made the engine step raise and every
    sequence of that batch (other clients' too) failed with 500."""
    stream_body = {"model": MODEL, "prompt": "The quick", "max_tokens": 100, "ignore_eos": True, "temperature": 0,
                   "stream": True}

    def stream() -> list[str]:
        with httpx.stream("POST", srv.url + "/v1/completions", json=stream_body, timeout=60) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    odd = [{"temperature": 1e-38}, {"temperature": 1e-45}, {"temperature": 5e-324}, {"top_p": 1e-45},
           {"top_p": 5e-324, "temperature": 2}, {"temperature": 1e-300, "top_p": 1e-300, "top_k": 3, "seed": 1},
           {"temperature": 2, "frequency_penalty": -2, "presence_penalty": 2, "repetition_penalty": 1e-300}]
    with cf.ThreadPoolExecutor(12) as ex:
        streams = [ex.submit(stream) for _ in range(3)]
        odd_r = [ex.submit(complete_tiny, srv, n=2, ignore_eos=True, **o) for o in odd * 2]
        for f in odd_r:
            assert f.result().status_code == 200, f.result().text
        for f in streams:
            lines = f.result()
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
            assert not any('"error"' in line for line in lines)
    # greedy through a tiny temperature equals temperature 0
    a = complete_tiny(srv, temperature=1e-38, max_tokens=12).json()["choices"][0]["text"]
    b = complete_tiny(srv, temperature=0, max_tokens=12).json()["choices"][0]["text"]
    assert a == b


# -- 2: 400, never 500 ---------------------------------------------------------------------

RAW_BAD = [
    ("lone surrogate in a prompt", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "surrogate", "/v1/completions"),
    ("lone surrogate in a prompt list", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "surrogate",
     "/v1/completions"),
    ("lone surrogate in a chat message", b'{"messages": [{"role": "user", "content": "x\\ud800"}]}', "surrogate",
     "/v1/chat/completions"),
    ("5000-digit integer", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "digits", "/v1/completions"),
    ("5000-digit token id", b'{"prompt": [' + b"1" * 5000 + b"]}", "digits", "/v1/completions"),
    ("100000-deep JSON", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", "deep", "/v1/completions"),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', "NaN", "/v1/completions"),
    ("Infinity penalty", b'{"prompt": "hi", "frequency_penalty": Infinity}', "Infinity", "/v1/completions"),
]


@pytest.mark.parametrize("name,raw,word,path", RAW_BAD, ids=[b[0] for b in RAW_BAD])
def test_malformed_values_get_400(srv, name, raw, word, path):
    r = httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert word.lower() in r.json()["error"]["message"].lower()


BAD = [
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
    ({"best_of": 2}, "best_of"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),  # no json_schema given
    ({"guided_regex": "a("}, "guided_regex"),  # the grammar library refuses it
    ({"suffix": "x"}, "suffix"),
]


@pytest.mark.parametrize("extra,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_unsupported_or_out_of_range_fields_are_named(srv, extra, field):
    r = complete_tiny(srv, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].split(".")[0] == field and field in err["message"]


def test_chat_tool_settings_that_cannot_work_are_refused_by_name(srv):
    msgs = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for extra, field in (({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
                         ({"tool_choice": "required"}, "tool_choice"),
                         ({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                          "tool_choice"),
                         ({"response_format": {"type": "json_schema"}}, "response_format"),
                         ({"functions": [{"name": "f"}]}, "functions")):
        r = srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == field, r.text
    ok = srv.post("/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "tools": [tool], "tool_choice": "none",
                                           "response_format": {"type": "text"}, "best_of": 1})
    assert ok.status_code == 200, ok.text


def test_seed_at_the_top_of_the_range_with_n_choices(srv):
    """seed + i for n choices overflowed the generator's range: now it wraps."""
    body = {"seed": 2 ** 64 - 1, "n": 3, "temperature": 1.0}
    a, b = complete_tiny(srv, **body), complete_tiny(srv, **body)
    assert a.status_code == 200, a.text
    assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]
    assert complete_tiny(srv, seed=-(2 ** 63), n=2, temperature=1.0).status_code == 200


# -- 10: penalties, bias, min_tokens are applied, not ignored ---------------------------------

def test_penalties_and_bias_equal_the_core(srv, ckpt):
    from modeling import SamplingParams, load_model

    model = load_model(ckpt["base"])
    prompt = "def add(a, b):\n    return a + b\n"
    ids = model.tokenizer.encode(prompt)
    cases = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(repetition_penalty=1.8),
             dict(frequency_penalty=-1.0, presence_penalty=0.5, repetition_penalty=0.7)]
    plain = complete_tiny(srv, prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True).json()["choices"][0]["text"]
    differs = 0
    for c in cases:
        body = complete_tiny(srv, prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True, **c).json()
        want = model.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **c))
        assert body["choices"][0]["text"] == want.text, c
        differs += want.text != plain
    assert differs >= 2  # the penalties change greedy output
    # logit_bias +100 on one token makes it the only one generated
    t = ids[3]
    body = complete_tiny(srv, prompt=prompt, max_tokens=5, temperature=0, ignore_eos=True,
                     logit_bias={str(t): 100}, logprobs=0).json()
    assert body["choices"][0]["logprobs"]["tokens"] == [model.tokenizer.token_text(t)] * 5
    # min_tokens: eos pushed to the top stops at once, unless min_tokens holds it back
    eos = sorted(model.tokenizer.eos_token_ids or model.config.eos_token_ids)[0]
    r = complete_tiny(srv, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(eos): 100}).json()
    assert r["usage"]["completion_tokens"] == 0 and r["choices"][0]["finish_reason"] == "stop"
    r = complete_tiny(srv, prompt=prompt, max_tokens=6, temperature=0, logit_bias={str(eos): 100}, min_tokens=3).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "stop"


def test_models_lists_every_accepted_id(srv):
    ids = [m["id"] for m in srv.get("/v1/models").json()["data"]]
    assert {MODEL, f"{MODEL}:full", f"{MODEL}:auto", f"{MODEL}:code", f"{MODEL}:prose"} == set(ids)
    client = _openai(srv)
    for mid in ids:
        r = client.completions.create(model=mid, prompt="def f", max_tokens=1, temperature=0)
        assert r.model_extra["profile"] in ("full", "code", "prose")
    nf = complete_tiny(srv, model=f"{MODEL}:nope").json()["error"]["message"]
    assert all(n in nf for n in ("auto", "full", "code", "prose"))


# -- 7: work a request may ask for; tokenizing off the event loop -------------------------------

def test_request_work_is_bounded(srv):
    prompts = ["def add(a, b):\n    return a + b\n" * 6] * 200
    r = complete_tiny(srv, prompt=prompts, echo=True, logprobs=20, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert "--max-request-logprobs" in r.json()["error"]["message"]
    ok = complete_tiny(srv, prompt=prompts[:4], echo=True, logprobs=1, max_tokens=1)
    assert ok.status_code == 200


def test_long_prompt_is_tokenized_off_the_event_loop(srv):
    """Before: a 1 MB prompt was tokenized on the event loop and /health stalled
    for as long. Now /health answers while it runs (and since issue 17 a text
    that cannot fit is refused before tokenizing)."""
    text = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42; " * 16000  # ~950 KB
    done = threading.Event()
    gaps: list[float] = []

    def poll() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
            gaps.append(time.monotonic() - t0)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=60)
    took = time.monotonic() - t0
    done.set()
    poller.join()
    assert r.status_code == 400 and "context" in r.json()["error"]["message"], r.text
    # issue 17: a text this long cannot fit the context, so it is refused before it is tokenized at all
    assert "before tokenizing" in r.json()["error"]["message"], r.text
    if took >= 0.3:
        assert max(gaps) < took / 2, (max(gaps), took)


# -- 8, 12: start-up checks, start-up summary, access lines -------------------------------------

def _start_fail_all(cases: list[tuple[list[str], int | None]]) -> list[str]:
    """Start emo-serve with each argument list (in parallel); each must exit
    non-zero with a message and no traceback. Returns their stderr."""
    procs = [subprocess.Popen([sys.executable, "-m", "server.cli", "--port", str(port or _free_port()), *args],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args, port in cases]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode != 0, err
        assert "Traceback" not in err, err
        errs.append(err)
    return errs


def test_startup_errors_name_the_option(ckpt, tmp_path):
    base = str(ckpt["base"])
    pdir = tmp_path / "profiles"  # a symlink in --profiles-dir that leads outside it
    pdir.mkdir()
    (pdir / "code").symlink_to(ckpt["code"])
    with socket.socket() as taken:  # a taken port fails before "ready"
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [(["--model", base, "--api-key", ""], "--api-key is empty"),
                 (["--model", base, "--api-key", "good", "--api-key", " "], "--api-key is empty"),
                 (["--model", base, "--max-model-len", "-5"], "--max-model-len"),
                 (["--model", base, "--request-timeout", "-1"], "--request-timeout"),
                 (["--model", base, "--request-timeout", "nan"], "--request-timeout"),
                 (["--model", base, "--profiles-dir", str(pdir)], "outside"),
                 (["--model", base, "--log-level", "info", "--port", str(taken.getsockname()[1])], "cannot listen")]
        errs = _start_fail_all([(args, None) for args, _ in cases])
    for (_, word), err in zip(cases, errs):
        assert word in err, err
    assert not re.search(r"ready in [0-9]", errs[-1]) and "listening on" not in errs[-1]


def test_startup_summary_and_access_lines(ckpt):
    s = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--served-model-name", MODEL,
                "--max-model-len", "100000", "--log-level", "info", "--api-key", KEY, "--public-metrics"],
               ckpt["root"] / "summary.log")
    h = {"Authorization": f"Bearer {KEY}"}
    try:
        s.wait()
        assert complete_tiny(s, profile="code", max_tokens=4, ignore_eos=True).status_code == 401
        assert s.get("/metrics").status_code == 200  # --public-metrics (tests/test_server.py: keyed by default)
        assert s.post("/v1/completions", {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 4,
                                          "ignore_eos": True, "profile": "code"}, headers=h).status_code == 200
        assert s.post("/v1/completions", {"prompt": "hi", "profile": "nope"}, headers=h).status_code == 404
        time.sleep(0.3)
    finally:
        s.stop()
    log = s.log.read_text()
    for words in (("device cpu", "dtype float32", "1 threads", "OpenMP wait passive (default"), ("context 128 tokens", "capped"),
                  ("profile code:", "4 experts per MoE layer", "MiB of experts"), ("profile full:",),
                  (f"listening on {s.url}",), ("--max-model-len 100000 is more than the model's limit",)):
        assert any(all(w in line for w in words) for line in log.splitlines()), (words, log)
    access = [line for line in log.splitlines() if "emo_serve.access" in line and "/v1/completions" in line]
    assert len(access) == 3, log
    assert '"POST /v1/completions" 401' in access[0]
    assert "200 profile=code prompt_tokens=" in access[1] and "completion_tokens=4" in access[1]
    assert "latency=" in access[1] and '"POST /v1/completions" 404' in access[2]


def test_disconnect_is_quiet_and_sigterm_ends_streams_with_an_error(ckpt):
    s = Server(["--model", str(ckpt["base"]), "--max-batch", "1", "--shutdown-timeout", "0"],
               ckpt["root"] / "sigterm.log")
    try:
        s.wait()
        long = {"prompt": [5] * 8, "max_tokens": 115, "n": 8, "ignore_eos": True, "temperature": 0}
        # a non-streaming client that gives up: cancelled, logged without a traceback
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json=long, timeout=0.3)
        # all 8 sequences of the request are cancelled: the counter appears with the first, the
        # queue empties once the engine has dropped the other seven (later under load)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ('status="cancelled"' in s.get("/metrics").text
                                                   and s.get("/health").json()["waiting"] == 0):
            time.sleep(0.1)
        assert 'status="cancelled"' in s.get("/metrics").text
        assert s.get("/health").json()["waiting"] == 0
        # SIGTERM during a stream: the stream ends with an error event and [DONE]
        with httpx.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: {")
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        err = json.loads(rest[-2][6:])["error"]
        assert err["type"] == "unavailable" and "shutting down" in err["message"]
        assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        s.stop()
    log = s.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


# -- 4: the engine thread dies or stalls ------------------------------------------------------------

class InProcessServer:
    """The app under uvicorn in this process, so that a test can reach its engine
    thread (kill it, or stall it with a slow event sink)."""

    def __init__(self, **config):
        import uvicorn

        from server.app import build_state, create_app
        from server.config import ServerConfig

        self.state = build_state(ServerConfig(file_leases=False, **config))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("in-process server did not start")

    def stall(self, seconds: float) -> threading.Event:
        """Submit a sequence whose event sink keeps the engine thread busy for
        `seconds` (in Python code, so an asynchronous exception can land)."""
        from modeling import SamplingParams
        from server.engine import Sequence

        entered = threading.Event()

        def sink(ev) -> None:
            if entered.is_set():  # only the first event stalls
                return
            entered.set()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(0.02)

        self.state.engine.submit([Sequence([5, 6], SamplingParams(max_tokens=1), "full", sink)])
        assert entered.wait(10)
        return entered

    def kill_engine(self) -> None:
        ident = self.state.engine.thread.ident
        assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(SystemExit)) == 1
        self.state.engine.thread.join(10)
        assert not self.state.engine.thread.is_alive()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_dead_engine_refuses_work_with_503(ckpt):
    s = InProcessServer(model=str(ckpt["base"]), request_timeout=0)
    try:
        s.stall(60)
        with cf.ThreadPoolExecutor(1) as ex:
            waiting = ex.submit(httpx.post, s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                                timeout=20)
            time.sleep(0.5)
            s.kill_engine()
            r = waiting.result()
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
        assert r.headers.get("connection") == "close"
        h = httpx.get(s.url + "/health", timeout=5)
        assert h.status_code == 503 and "engine stopped" in h.json()["status"]
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=20)
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert "not running" in r.json()["error"]["message"] and r.headers.get("connection") == "close"
    finally:
        s.stop()


def test_deadline_holds_when_the_engine_stalls(ckpt):
    s = InProcessServer(model=str(ckpt["base"]), request_timeout=0.5)
    try:
        s.stall(4)
        t0 = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=20)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert took < 2.5, took  # the engine was busy for 4 s: only the asyncio side can have answered
        time.sleep(4)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                          timeout=20).status_code == 200
    finally:
        s.stop()


def test_deadline_answers_when_events_wait_in_the_queue(ckpt):
    """The event loop is held up past the deadline while the engine keeps queueing
    tokens and then its own 504: the request must still be answered (a zero-timeout
    wait on the queue once cancelled every get, so a non-empty queue was never read)."""
    s = InProcessServer(model=str(ckpt["base"]), request_timeout=0.6, max_batch=1)
    try:
        loop = s.server.servers[0].get_loop()
        with cf.ThreadPoolExecutor(1) as ex:
            t0 = time.monotonic()
            fut = ex.submit(httpx.post, s.url + "/v1/completions",
                            json={"prompt": [5] * 8, "max_tokens": 115, "n": 8, "ignore_eos": True, "temperature": 0},
                            timeout=30)
            while not s.state.engine.running and time.monotonic() - t0 < 10:
                time.sleep(0.005)
            loop.call_soon_threadsafe(time.sleep, 1.2)  # the event loop stalls; the engine goes on
            r = fut.result()
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert time.monotonic() - t0 < 10
    finally:
        s.stop()


# -- 9: vLLM's tokenizer endpoints --------------------------------------------------------------------

def test_tokenizer_endpoints_have_vllms_shapes(srv, ckpt):
    from modeling import load_model

    tok = load_model(ckpt["base"]).tokenizer
    info = srv.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and "eos_token" in info and info["model_max_length"] == 128
    r = srv.post("/tokenize", {"prompt": "def add(a, b):", "add_special_tokens": False, "return_token_strs": True})
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == tok.encode("def add(a, b):") and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]) == "def add(a, b):" and body["max_model_len"] == 128
    chat = srv.post("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    d = srv.post("/detokenize", {"tokens": body["tokens"], "model": MODEL}).json()
    assert d == {"prompt": "def add(a, b):"}
    assert srv.post("/detokenize", {"tokens": [10 ** 6]}).status_code == 400
    assert srv.post("/tokenize", {"prompt": "x", "model": "other"}).status_code == 404
    assert srv.post("/tokenize", {"prompt": 5}).status_code == 400
