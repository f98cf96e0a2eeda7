"""Do `auto` requests stall the streams already running? (issue 17)

While 8 greedy streams decode, a burst of 8 `auto` requests (long prompts, one
token each) arrives. Prints the inter-token latency of the running streams
(p50, p99, max) over the burst, and checks that the streams' greedy text is
the same as without the burst. With --before DIR it runs the same on another
checkout (e.g. a worktree at main) in the same invocation, so the two rows are
measured side by side on the same machine:

    flock /tmp/emo-bench.lock python benchmarks/bench_auto_stall.py --before /work/wt-before --rounds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STREAM_PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "#include <stdio.h>\n",
                  "The history of the city begins", "12 + 30 = 42\n7 * 6 = ", "import os\nimport sys\n",
                  "Once upon a time,", "for (int i = 0; i < n; i++) {\n"]
AUTO_PROMPT = ("The quick brown fox jumps over the lazy dog, and the licence grants permission to copy. "
               "def add(a, b):\n    return a + b\n") * 5  # ~220 tokens: the demo serves 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def start(root: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--log-level", "warning",
           "--auto-rule", args.auto_rule, *args.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server in {root} exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"server in {root} did not start")


def stream(url: str, prompt: str, max_tokens: int, times: list[float]) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj["choices"] and obj["choices"][0]["text"]:
                times.append(time.monotonic())
                text += obj["choices"][0]["text"]
    return text


def one_round(url: str, args, burst: bool) -> tuple[list[float], list[str], float]:
    """Inter-token gaps of the streams (from the burst on, or over the same
    stretch without one), their texts, and how long the burst took to answer."""
    times = [[] for _ in STREAM_PROMPTS]
    with cf.ThreadPoolExecutor(len(STREAM_PROMPTS) + args.autos) as ex:
        futs = [ex.submit(stream, url, p, args.max_tokens, t) for p, t in zip(STREAM_PROMPTS, times)]
        while min(len(t) for t in times) < 4:  # every stream is decoding
            time.sleep(0.01)
        t_burst = time.monotonic()
        took = 0.0
        if burst:
            body = {"prompt": AUTO_PROMPT, "max_tokens": 1, "profile": "auto", "temperature": 0}
            autos = [ex.submit(httpx.post, url + "/v1/completions", json=body, timeout=600)
                     for _ in range(args.autos)]
            for a in autos:
                assert a.result().status_code == 200, a.result().text
            took = time.monotonic() - t_burst
        texts = [f.result() for f in futs]
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if a >= t_burst]
    return gaps, texts, took


def measure(root: Path, args) -> dict:
    proc, url = start(root, args)
    try:
        _, quiet_texts, _ = one_round(url, args, burst=False)  # warm-up, and the texts without a burst
        quiet, loaded, tooks, same = [], [], [], True
        for _ in range(args.rounds):
            g, texts, _ = one_round(url, args, burst=False)
            quiet += g
            g, texts_b, took = one_round(url, args, burst=True)
            loaded += g
            tooks.append(took)
            same &= texts == quiet_texts and texts_b == quiet_texts
        return {"quiet": quiet, "loaded": loaded, "burst_s": tooks, "same_text": same, "texts": quiet_texts}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="another checkout to measure the same way (e.g. a worktree at main)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--autos", type=int, default=8, help="auto requests in the burst (default 8)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per running stream (default 48)")
    ap.add_argument("--auto-rule", default="affinity", help="emo-serve --auto-rule (default affinity)")
    ap.add_argument("--server-args", default="--threads 2", help="more emo-serve arguments, one string")
    args = ap.parse_args()
    runs = {}
    if args.before:
        runs["before"] = measure(Path(args.before).resolve(), args)
    runs["this"] = measure(ROOT, args)
    print(f"\n8 greedy streams x {args.max_tokens} tokens; burst of {args.autos} auto requests "
          f"({len(AUTO_PROMPT)} chars, rule {args.auto_rule}); {args.rounds} rounds; server {args.server_args}")
    print(f"{'checkout':8s} {'':6s} {'gaps':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'burst s':>8s} same text")
    for name, r in runs.items():
        for kind in ("quiet", "loaded"):
            g = [x * 1000 for x in r[kind]]
            burst = f"{sum(r['burst_s']) / len(r['burst_s']):8.2f}" if kind == "loaded" else " " * 8
            print(f"{name:8s} {kind:6s} {len(g):6d} {percentile(g, 50):8.1f} {percentile(g, 99):8.1f} "
                  f"{max(g):8.1f} {burst} {r['same_text']}")
    if "before" in runs:
        print(f"greedy texts equal across checkouts: {runs['before']['texts'] == runs['this']['texts']}")


if __name__ == "__main__":
    main()
