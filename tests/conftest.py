"""Fixtures shared by the server test modules (test_server, test_server_hardening, test_fuzz)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus
from tests.test_server import _emo_subset


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny EMO checkpoint and two overlapping profiles (code, prose) built by emo-subset."""
    root = tmp_path_factory.mktemp("serve")
    base = write_checkpoint_dir(root / "tiny-emo", emo_config())
    corpus = write_domain_corpus(root / "corpus.jsonl")
    procs = {name: _emo_subset("build", str(base), "--out", str(root / name), "--name", name, "-q", "--corpus",
                               str(corpus), "--domain", name, "--keep", "4") for name in ("code", "prose")}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, f"emo-subset build {name} failed:\n{out}"
    listed = root / "listed.json"
    listed.write_text(json.dumps({"0": [0, 3, 7], "1": [1, 2, 7], "2": [5, 6, 7]}))
    return {"root": root, "base": base, "code": root / "code", "prose": root / "prose", "listed": listed}


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models run fastest on one thread, above all on a shared, busy machine
    (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_path(monkeypatch):
    """Models loaded in the test run on the pure-torch kernel path (EMO_CPU_ISA=torch): for what only
    that path has (`--compile`'s Inductor loops, the MXFP4 dequantization cache)."""
    monkeypatch.setenv("EMO_CPU_ISA", "torch")
