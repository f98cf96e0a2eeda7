"""Issue 17: the defects a second adversarial pass found, each reproduced against
a real emo-serve (a process on 127.0.0.1 driven with httpx, or for the engine's
scheduling the same engine in this process over the same checkpoint)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.test_server import KEY, ROOT, Server, _env

MODEL = "tiny-emo"


@pytest.fixture(scope="module")
def srv(ckpt):
    s = Server(["--model", str(ckpt["base"]), "--profile", str(ckpt["code"]), "--profile", str(ckpt["prose"]),
                "--served-model-name", MODEL, "--log-level", "info"], ckpt["root"] / "adversarial.log")
    try:
        yield s.wait()
    finally:
        s.stop()


def _complete(s: Server, **body) -> httpx.Response:
    return s.post("/v1/completions", {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 8, **body})


# -- 1: /v1/routing passes and auto probes must not starve generation ----------------------------------

def _engine_state(ckpt, **config):
    from server.app import build_state
    from server.config import ServerConfig

    return build_state(ServerConfig(model=str(ckpt["base"]), profiles=[str(ckpt["code"]), str(ckpt["prose"])],
                                    **config))


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
    assert probed_at_token[0] <= 2, probed_at_token  # before: 8 (every probe ran before the first step)
