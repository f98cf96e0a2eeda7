"""End-to-end client tests against the REAL emo-serve.

A server process is started on 127.0.0.1 on a free port with an API key, and
the tests wait for `/health`. It serves the bundled demo model
(modeling/bundled/emo-demo) when that exists; until then a tiny EMO checkpoint
(tests/checkpoints.py) with two profiles cut by `emo-subset`, as
tests/test_server.py does. Covered: non-streaming and streaming completions, a
profile per call, the server's error message surfaced, retry on 429 when the
server's queue is full, the `emo-client` command, and the `openai` SDK pointed
at the server with `base_url`.

Skipped while `server.cli` does not exist. The client's own logic (retries,
backoff, SSE parsing, errors) is tested over real sockets against a stand-in
server in tests/test_client.py.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

if importlib.util.find_spec("server") is None or importlib.util.find_spec("server.cli") is None:
    pytest.skip("server.cli does not exist yet: the emo-serve end-to-end tests wait for it",
                allow_module_level=True)

from clients import (  # noqa: E402
    AuthenticationError,
    Client,
    EmoError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from clients import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "e2e-key"
PROMPT = "def add(a, b):"
START_TIMEOUT = float(os.environ.get("EMO_E2E_START_TIMEOUT", "300"))
RESERVED = ("full", "auto")
BUNDLED = ROOT / "modeling" / "bundled" / "emo-demo"



def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> tuple[str, list[str]]:
    """(model name, emo-serve arguments that choose the model and its profiles)."""
    if (BUNDLED / "config.json").is_file():
        return "emo-demo", []
    from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus

    root = tmp_path_factory.mktemp("e2e-model")
    base = write_checkpoint_dir(root / "tiny-emo", emo_config())
    corpus = write_domain_corpus(root / "corpus.jsonl")
    from tests.test_server import emo_subset

    for name in ("code", "prose"):
        emo_subset("build", base, "--out", root / name, "--name", name, "-q", "--corpus", corpus, "--domain", name,
                   "--keep", "4", env=_env())
    return "tiny-emo", ["--model", str(base), "--profile", str(root / "code"), "--profile", str(root / "prose")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, tmp: Path, model_args: list[str], *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"emo-serve-{self.port}.log"
        self.log = open(self.log_path, "wb")
        code = "import sys; from server.cli import main; sys.exit(main())"
        argv = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", str(self.port),
                "--api-key", API_KEY, "--threads", "1", *model_args, *extra]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emo-serve exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"emo-serve not healthy after {START_TIMEOUT}s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def MODEL(model_args) -> str:
    return model_args[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_args):
    s = ServerProcess(tmp_path_factory.mktemp("e2e"), model_args[1])
    try:
        s.wait_healthy()
    except Exception:
        s.stop()
        raise
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with Client(server.url, api_key=API_KEY, timeout=120, backoff_base=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def profile_names(server):
    with Client(server.url, api_key=API_KEY) as c:
        names = [p.name for p in c.profiles() if p.name not in RESERVED]
    assert len(names) >= 2, "the model should come with at least two profiles"
    return names


def test_health_models_profiles(client, profile_names, MODEL):
    assert client.health().ok
    ids = [m.id for m in client.models()]
    assert MODEL in ids
    for name in profile_names:
        assert f"{MODEL}:{name}" in ids
    for p in client.profiles():
        assert p.total_bytes is None or p.total_bytes > 0
        if p.name not in RESERVED:
            assert p.total_experts and p.expert_bytes


def test_complete_non_streaming(client, profile_names):
    out = client.complete(PROMPT, profile=profile_names[0], max_tokens=8, temperature=0)
    assert out.object == "text_completion"
    assert out.profile == profile_names[0]
    assert isinstance(out.text, str) and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_a_profile_per_call(client, profile_names, MODEL):
    names = (profile_names + ["full"])[:3]
    served = [client.complete(PROMPT, profile=n, max_tokens=4, temperature=0).profile for n in names]
    assert served == names
    # `model: <base>:<profile>` selects the profile too
    with Client(client.base_url, api_key=API_KEY, model=MODEL, profile_in_model=True) as c:
        assert c.complete(PROMPT, profile=profile_names[-1], max_tokens=4).profile == profile_names[-1]


def test_streaming_matches_non_streaming_greedy(client, profile_names):
    profile = profile_names[0]
    full = client.complete(PROMPT, profile=profile, max_tokens=12, temperature=0)
    stream = client.complete(PROMPT, profile=profile, max_tokens=12, temperature=0, stream=True)
    deltas = list(stream)
    assert "".join(deltas) == stream.text == full.text
    assert stream.profile == profile
    assert stream.finish_reason in ("length", "stop")


def test_error_message_is_the_servers(server, client, MODEL):
    with pytest.raises(NotFoundError) as info:
        client.complete(PROMPT, profile="no-such-profile", max_tokens=4)
    raw = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": MODEL, "prompt": PROMPT, "profile": "no-such-profile", "max_tokens": 4})
    assert raw.status_code == 404
    assert info.value.message == raw.json()["error"]["message"] and info.value.message
    with Client(server.url, api_key="wrong", model=MODEL) as c:
        with pytest.raises(AuthenticationError) as info:
            c.complete(PROMPT, max_tokens=4)
    assert info.value.status == 401 and info.value.message


def test_cli_against_the_server(server, profile_names, MODEL, capsys):
    base = ["--base-url", server.url, "--api-key", API_KEY]
    assert cli.main(base + ["complete", PROMPT, "--profile", profile_names[0], "--max-tokens", "4", "-v"]) == 0
    assert f"profile={profile_names[0]}" in capsys.readouterr().err
    assert cli.main(base + ["models"]) == 0
    assert MODEL in capsys.readouterr().out.split()
    assert cli.main(base + ["complete", PROMPT, "--profile", "no-such-profile"]) == 1
    assert "404" in capsys.readouterr().err


@pytest.mark.slow
def test_retry_on_429_when_the_queue_is_full(tmp_path, model_args, profile_names, MODEL):
    """A server with room for one running and one waiting request, hit by 12 at once."""
    s = ServerProcess(tmp_path, model_args[1], "--max-batch", "1", "--max-queue", "1")
    try:
        s.wait_healthy()
        barrier = threading.Barrier(12)

        def hammer(max_retries: int) -> list:
            results: list = [None] * 12

            def one(i: int) -> None:
                with Client(s.url, api_key=API_KEY, model=MODEL, max_retries=max_retries,
                            backoff_base=0.1, backoff_max=1.0, timeout=120) as c:
                    barrier.wait()
                    try:
                        results[i] = c.complete(PROMPT, profile=profile_names[0], max_tokens=64, temperature=0)
                    except EmoError as exc:
                        results[i] = exc

            threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            barrier.reset()
            return results

        refused = [r for r in hammer(0) if isinstance(r, EmoError)]
        assert refused, "a full queue should refuse some of 12 concurrent requests"
        for err in refused:
            assert isinstance(err, (RateLimitError, ServiceUnavailableError)) and err.message
        retried = hammer(60)
        assert all(not isinstance(r, EmoError) for r in retried), [str(r) for r in retried]
        assert all(r.profile == profile_names[0] for r in retried)
    finally:
        s.stop()


# -- the openai SDK, pointed at emo-serve with base_url ---------------------------------


@pytest.fixture
def sdk(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_openai_sdk_completions(sdk, profile_names, MODEL):
    resp = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"profile": profile_names[0]})
    assert resp.object == "text_completion" and isinstance(resp.choices[0].text, str)
    assert (resp.model_extra or {}).get("profile") == profile_names[0]
    assert resp.usage.completion_tokens <= 8
    # profile by model name
    resp2 = sdk.completions.create(model=f"{MODEL}:{profile_names[-1]}", prompt=PROMPT, max_tokens=4)
    assert (resp2.model_extra or {}).get("profile") == profile_names[-1]


def test_openai_sdk_streaming(sdk, profile_names, MODEL):
    full = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"profile": profile_names[0]})
    text = ""
    for chunk in sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                        extra_body={"profile": profile_names[0]}):
        if chunk.choices:
            text += chunk.choices[0].text
    assert text == full.choices[0].text


def test_openai_sdk_models_and_errors(sdk, MODEL):
    import openai

    assert MODEL in [m.id for m in sdk.models.list()]
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"profile": "no-such-profile"})
    assert info.value.status_code == 404
