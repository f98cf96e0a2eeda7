"""emo-serve checks profiles against their recorded hashes (issue 12, item 5): real server processes over
profiles built by emo-subset, one of them damaged on disk the way a bad copy or a hand edit damages it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from modeling import ProfileManifest, load_model
from modeling.io.safetensors_io import MappedSafetensors
from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus
from tests.test_server import ROOT, Server, _emo_subset, _env, _free_port

TEXT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = write_checkpoint_dir(root / "tiny-emo", emo_config())
    corpus = write_domain_corpus(root / "corpus.jsonl")
    procs = {n: _emo_subset("build", str(base), "--out", str(root / "clean" / n), "--name", n, "-q", "--corpus",
                            str(corpus), "--domain", n, "--keep", "4") for n in ("code", "prose")}
    for n, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    return root, base


def _copy(built, dest: str) -> dict[str, Path]:
    root, _ = built
    out = root / dest
    shutil.copytree(root / "clean", out)
    return {n: out / n for n in ("code", "prose")}


def _corrupt_shared_expert(code: Path, prose: Path) -> None:
    """Overwrite, in code's shard, the gate matrix of an expert that prose keeps too (the server maps it
    once, from code): a damaged profile then reaches prose and `full` unless the server notices."""
    mc, mp = ProfileManifest.read(code), ProfileManifest.read(prose)
    layer, orig = next((i, e) for i, ids in mc.kept_experts.items() for e in ids if e in mp.kept_experts[i]
                       and e != ids[-1])  # not the shared expert (last): routed, so it changes the choice
    local = mc.kept_experts[layer].index(orig)
    path = code / "model.safetensors"
    info = MappedSafetensors(path).tensors[f"model.layers.{layer}.mlp.experts.{local}.gate_proj.weight"]
    data = bytearray(path.read_bytes())
    data[info.start:info.end] = torch.full((info.nbytes // 4,), 5.0).numpy().tobytes()
    path.write_bytes(bytes(data))


def _prompt_logprobs(server: Server, **sel) -> list[float] | tuple[int, dict]:
    r = server.post("/v1/completions", {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 0,
                                        "temperature": 0, **sel})
    if r.status_code != 200:
        return r.status_code, r.json()
    return r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]


def _reference(base: Path, pool=None) -> list[float]:
    m = load_model(base)
    ids = m.tokenizer.encode(TEXT)
    lp = torch.log_softmax(m.logits(ids, pool=pool), -1)
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def _state(server: Server) -> dict[str, dict]:
    return {p["name"]: p for p in server.get("/v1/profiles").json()["data"]}


def _wait_state(server: Server, name: str, timeout: float = 60.0) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = _state(server)[name]
        if st["state"] != "verifying":
            return st
        time.sleep(0.1)
    raise AssertionError(f"profile {name} still verifying after {timeout}s")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def test_background_verification_takes_a_corrupt_profile_out_and_keeps_full_and_others_exact(built):
    root, base = built
    prof = _copy(built, "bg")
    _corrupt_shared_expert(prof["code"], prof["prose"])
    want_full = _reference(base)
    want_prose = _reference(base, ProfileManifest.read(prof["prose"]).pool())
    s = Server(["--model", str(base), "--profile", str(prof["code"]), "--profile", str(prof["prose"]),
                "--served-model-name", "tiny-emo"], root / "bg.log").wait()
    try:
        code = _wait_state(s, "code")
        assert code["state"] == "failed" and any("sha256 differs" in p for p in code["problems"]), code
        assert _wait_state(s, "prose")["state"] == "verified"
        for sel in ({"profile": "code"}, {"model": "tiny-emo:code"}):
            status, body = _prompt_logprobs(s, **sel)
            assert status == 503 and body["error"]["code"] == "profile_unavailable", body
            assert "code" in body["error"]["message"] and "verification" in body["error"]["message"]
        # the damaged bytes no longer reach `full` or the profile that shared the expert
        assert _close(_prompt_logprobs(s, profile="full"), want_full)
        assert _close(_prompt_logprobs(s, profile="prose"), want_prose)
        assert s.get("/health").status_code == 200
    finally:
        s.stop()


def test_verify_flag_checks_before_healthy_and_finds_an_edited_manifest(built):
    root, base = built
    prof = _copy(built, "flag")
    man = json.loads((prof["prose"] / "profile.json").read_text())
    man["kept_experts"]["0"] = sorted(set(range(8)) - set(man["kept_experts"]["0"]) - {7})[:3] + [7]
    (prof["prose"] / "profile.json").write_text(json.dumps(man))  # kept ids edited, hash left as it was
    s = Server(["--model", str(base), "--profile", str(prof["code"]), "--profile", str(prof["prose"]),
                "--served-model-name", "tiny-emo", "--verify"], root / "flag.log").wait()
    try:
        st = _state(s)  # the first answer already has every verdict: the check ran before /health said ok
        assert st["code"]["state"] == "verified"
        assert st["prose"]["state"] == "failed" and any("edited" in p for p in st["prose"]["problems"])
        assert _prompt_logprobs(s, profile="prose")[0] == 503
        assert _close(_prompt_logprobs(s, profile="code"),
                      _reference(base, ProfileManifest.read(prof["code"]).pool()))
    finally:
        s.stop()


def test_corrupt_checkpoint_the_server_runs_on(built):
    """Without --model the first profile's non-expert weights serve every request: when it fails,
    --verify refuses to start, and the background check stops serving (health and requests 503)."""
    root, _ = built
    prof = _copy(built, "alone")
    _corrupt_shared_expert(prof["code"], prof["prose"])
    p = subprocess.run([sys.executable, "-m", "server.cli", "--port", str(_free_port()), "--profile",
                        str(prof["code"]), "--verify"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "--verify" in p.stderr and "sha256 differs" in p.stderr, p.stderr
    s = Server(["--profile", str(prof["code"]), "--profile", str(prof["prose"])], root / "alone.log")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:  # up, and the background check done (it may finish first)
            try:
                if s.get("/health").status_code == 503:
                    break
            except httpx.HTTPError:
                assert s.proc.poll() is None, s.log.read_text()
            time.sleep(0.1)
        h = s.get("/health")
        assert h.status_code == 503 and "verification" in h.json()["status"]
        for sel in ({"profile": "prose"}, {"profile": "full"}, {}):
            status, body = _prompt_logprobs(s, **sel)
            assert status == 503 and body["error"]["code"] == "model_unavailable", body
    finally:
        s.stop()
