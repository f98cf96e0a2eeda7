"""The container image, built and run for real with podman (issue 21).

The module builds the image with `deploy/build_image.py` (what `make image` runs:
the Dockerfile over a local Debian base made by mmdebstrap, this machine's pip
sources mounted into the build). podman's layer cache makes a rebuild of an
unchanged tree take about half a minute; a cold build (base, torch, dependencies)
takes several minutes (figures in deploy/README.md). Then one container serves
the bundled demo model with two profiles from a mounted folder, on a read-only
root file system, as the non-root user, and a server started on the host from the
same files answers the same requests:

- health: `/health` from the host, and the image's own HEALTHCHECK (`podman
  healthcheck run`);
- the same greedy tokens from the container and from the host (openai SDK);
- the container's memory (`podman stats`) within the request that
  deploy/memory_request.py computes for the same profiles;
- SIGTERM (`podman kill --signal TERM`) during a stream: the stream ends with
  `[DONE]` within the shutdown timeout, and the container exits by itself soon
  after (exit code 0), long before podman or Kubernetes would SIGKILL it.

Skipped, with the reason, where podman is not installed (`make setup-system`
installs it). Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_deploy import memory_request
from tests.test_server import Server, _free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "modeling" / "bundled" / "emo-demo"
IMAGE = "emo-serve:latest"  # the tag `make image` builds: the test and the Makefile share one layer cache
PROFILES = ("python", "c")
SHUTDOWN_S = 3.0
SERVER_ARGS = ["--threads", "1", "--shutdown-timeout", str(SHUTDOWN_S)]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (`make setup-system` installs podman, runc and mmdebstrap)"),
]


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert not check or p.returncode == 0, f"podman {' '.join(args)}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    return p


def figure(name: str, value) -> None:
    print(f"\n[image] {name}: {value}", file=sys.stderr)


@pytest.fixture(scope="module")
def image() -> str:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "deploy" / "build_image.py"), "--tag", IMAGE],
                       capture_output=True, text=True, timeout=3000)
    assert p.returncode == 0, f"image build failed:\n{p.stdout[-4000:]}{p.stderr[-8000:]}"
    figure("build (this run: cached layers unless the tree or the base changed)", f"{time.monotonic() - t0:.0f} s")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    figure("image size", f"{size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> Path:
    """A profiles folder to mount: copies of two of the demo's profiles (the mount is read-only)."""
    root = tmp_path_factory.mktemp("image") / "profiles"
    for name in PROFILES:
        shutil.copytree(DEMO / "profiles" / name, root / name)
    return root


@pytest.fixture(scope="module")
def host(profiles, tmp_path_factory):
    s = Server(["--model", str(DEMO), "--profiles-dir", str(profiles), *SERVER_ARGS],
               tmp_path_factory.mktemp("image-host") / "host.log")
    try:
        yield s.wait(120)
    finally:
        s.stop()


class Container:
    def __init__(self, image: str, profiles: Path):
        self.name = f"emo-image-test-{_free_port()}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.monotonic()
        podman("run", "--detach", "--name", self.name, "--read-only", "--publish", f"127.0.0.1:{self.port}:8000",
               "--volume", f"{profiles}:/profiles:ro", image,
               "--model", "/opt/emo-demo", "--profiles-dir", "/profiles", *SERVER_ARGS)

    def logs(self) -> str:
        p = podman("logs", self.name, check=False)
        return p.stdout + p.stderr

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name).stdout.strip() == "true"

    def wait_healthy(self, timeout: float = 300) -> float:
        while time.monotonic() - self.t0 < timeout:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            assert self.running(), f"the container exited:\n{self.logs()}"
            time.sleep(0.2)
        raise AssertionError(f"not healthy after {timeout} s:\n{self.logs()}")

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture(scope="module")
def container(image, profiles):
    c = Container(image, profiles)
    try:
        figure("podman run to a healthy /health", f"{c.wait_healthy():.1f} s")
        yield c
    finally:
        c.remove()


def test_image_config(image):
    cfg = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"][:1] == ["emo-serve"] and not cfg.get("Cmd")  # the bundled demo by default
    assert "/tmp" in cfg["Volumes"]
    health = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image).stdout
    assert "/health" in health, health
    # nothing of the build's pip sources is in the image (no pip config, no empty mount points), and no pip
    p = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
               "ls -A /opt && ! test -e /etc/pip.conf && ! test -e /etc/xdg/pip && ! python -m pip --version")
    assert p.stdout.split() == ["emo", "emo-demo", "venv"], p.stdout
    assert "No module named pip" in p.stderr, p.stderr


def test_health_user_and_read_only_root(container):
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0  # the image's HEALTHCHECK
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    p = podman("exec", container.name, "sh", "-c", "touch /opt/venv/x", check=False)
    assert p.returncode != 0 and "Read-only file system" in p.stderr, p.stderr
    podman("exec", container.name, "sh", "-c", "touch /tmp/x && rm /tmp/x")  # the tmp volume
    served = httpx.get(container.url + "/v1/profiles", timeout=10).json()
    names = {p["name"] for p in served["data"]} if "data" in served else set(served)
    assert set(PROFILES) <= names, served


def test_greedy_tokens_equal_the_host_servers(container, host):
    from openai import OpenAI

    out = {}
    for where, url in (("container", container.url), ("host", host.url)):
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        out[where] = []
        for profile, prompt in (("python", "def fib(n):"), ("c", "int main(void) {")):
            r = client.completions.create(model="emo-demo", prompt=prompt, max_tokens=24, temperature=0,
                                          logprobs=1, extra_body={"profile": profile})
            out[where].append((r.choices[0].text, r.choices[0].logprobs.tokens, r.choices[0].finish_reason))
    assert all(len(tokens) == 24 or reason == "stop" for _, tokens, reason in out["host"])
    assert out["container"] == out["host"]
    figure("greedy completions, container == host", [text for text, _, _ in out["host"]])


def _bytes(text: str) -> float:
    """podman's human sizes ("123.4MB", "1.2GiB") in bytes."""
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    num = text.rstrip("BiKMGk")
    return float(num) * units[text[len(num):]]


def test_memory_within_the_request(container, profiles):
    # after some decoding, so that the weights and the KV cache pages it touched are in
    httpx.post(container.url + "/v1/completions", timeout=60,
               json={"prompt": "def add(a, b):", "profile": "python", "max_tokens": 32, "temperature": 0})
    usage = podman("stats", "--no-stream", "--format", "{{.MemUsage}}", container.name).stdout.split("/")[0]
    used = _bytes(usage.strip())
    want = memory_request.estimate([profiles / n for n in PROFILES], model_dir=DEMO)
    figure("container memory (podman stats) vs memory_request.py",
           f"{used / 2**20:.0f} MiB vs {want['request']} (weights+KV+10%+1 GiB = {want['total_bytes'] / 2**20:.0f} MiB)")
    assert 0 < used <= want["total_bytes"]


def test_sigterm_ends_streams_and_the_container_within_the_shutdown_timeout(container):
    body = {"prompt": "def add(a, b):", "profile": "python", "max_tokens": 200, "n": 8, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", container.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        podman("kill", "--signal", "TERM", container.name)
        t0 = time.monotonic()
        rest = [line for line in lines if line]  # a cut stream would raise here (incomplete chunked body)
    ended = time.monotonic() - t0
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][len("data: "):])
    if "error" in last:  # cut by the shutdown timeout: an error event, not a dropped connection
        assert last["error"]["type"] == "unavailable" and "shutting down" in last["error"]["message"]
    else:
        assert last["choices"][0]["finish_reason"] == "length"
    code = int(podman("wait", container.name, timeout=SHUTDOWN_S + 30).stdout.strip())
    exited = time.monotonic() - t0
    figure("SIGTERM to the stream's end / to the container's exit",
           f"{ended:.1f} s / {exited:.1f} s (shutdown timeout {SHUTDOWN_S} s), exit code {code}")
    # Streams end at the shutdown timeout. The process then stops its engine and exits; podman
    # reports the exit about 1.2 s after the server's last log line (as for an idle container).
    # The bound is the server's own (uvicorn's graceful shutdown: timeout + 5 s, server/cli.py),
    # under `podman stop`'s 10 s and the Deployment's terminationGracePeriodSeconds: no SIGKILL.
    assert ended <= SHUTDOWN_S + 1.5
    assert exited <= SHUTDOWN_S + 5
    assert code in (0, 143), container.logs()
    log = container.logs()
    assert "Traceback" not in log and " ERROR " not in log, log


# -- compose: two replicas with different profiles behind the router -------------------------------

ROUTER_IMAGE = "localhost/litellm-router:1.80.0"  # deploy/compose/router.Containerfile: LiteLLM from PyPI
GROUPS = {"code": ("python", "c"), "prose": ("prose", "arith")}  # as deploy/compose/litellm-config.yaml


@pytest.fixture(scope="module")
def router_image() -> str:
    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (`make setup-system` installs it)")
    p = subprocess.run([sys.executable, str(ROOT / "deploy" / "build_image.py"), "--tag", ROUTER_IMAGE,
                        "--file", str(ROOT / "deploy" / "compose" / "router.Containerfile")],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"router image build failed:\n{p.stdout[-4000:]}{p.stderr[-8000:]}"
    return ROUTER_IMAGE


def test_compose_routes_each_profile_to_the_replica_that_hosts_it(image, router_image, tmp_path):
    data = tmp_path / "profiles"
    for group, names in GROUPS.items():
        for name in names:
            shutil.copytree(DEMO / "profiles" / name, data / group / name)
    port = _free_port()
    project = f"emo-image-test-{port}"
    router_key, upstream_key = "sk-test-router-key", "sk-test-upstream-key"
    env = {**os.environ, "EMO_IMAGE": image, "LITELLM_IMAGE": router_image, "EMO_PROFILES_DIR": str(data),
           "EMO_ROUTER_PORT": str(port), "EMO_API_KEY": router_key, "EMO_UPSTREAM_API_KEY": upstream_key}
    compose = ["podman-compose", "--project-name", project, "--file", str(ROOT / "deploy" / "compose.yaml")]
    t0 = time.monotonic()
    up = subprocess.run([*compose, "up", "--detach"], env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = f"http://127.0.0.1:{port}/v1/completions"
        auth = {"Authorization": f"Bearer {router_key}"}
        answered = {}
        for names in GROUPS.values():
            for name in names:
                body = {"model": f"emo-demo:{name}", "prompt": "The quick brown fox", "max_tokens": 8,
                        "temperature": 0}
                while True:  # the replicas and the router start together: wait for the route to answer
                    try:
                        r = httpx.post(url, json=body, headers=auth, timeout=60)
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        r = None
                    assert time.monotonic() - t0 < 300, f"no answer for {name}: {r and r.text}\n{_compose_logs(project)}"
                    time.sleep(1)
                answered[name] = r.json()["choices"][0]["text"]
        figure("compose up to every profile answered through the router", f"{time.monotonic() - t0:.0f} s")
        figure("a completion's fields after the router", {k: v for k, v in r.json().items() if k != "choices"})
        # each replica's access log names only its own group's profiles
        for group, names in GROUPS.items():
            log = _container_log(project, f"emo-serve-{group}")
            served = {name for g in GROUPS.values() for name in g if f"profile={name} " in log}
            assert served == set(names), (group, served, log)
        assert httpx.post(url, json={**body, "model": "emo-demo:nope"}, headers=auth, timeout=60).status_code >= 400
        assert httpx.post(url, json=body, timeout=60).status_code == 401  # the router wants its key
    finally:
        subprocess.run([*compose, "down", "--timeout", "5"], env=env, capture_output=True, text=True, timeout=300)
        # podman-compose 1.0.3's `down` leaves the project's networks
        for net in podman("network", "ls", "--format", "{{.Name}}").stdout.split():
            if net.startswith(project + "_"):
                podman("network", "rm", net, check=False)


def _compose_containers(project: str) -> list[str]:
    return podman("ps", "--all", "--filter", f"label=io.podman.compose.project={project}",
                  "--format", "{{.Names}}").stdout.split()


def _container_log(project: str, service: str) -> str:
    name = next(n for n in _compose_containers(project) if service in n)
    p = podman("logs", name, check=False)
    return p.stdout + p.stderr


def _compose_logs(project: str) -> str:
    return "\n".join(f"--- {n}\n{_container_log(project, n)[-3000:]}" for n in _compose_containers(project))
