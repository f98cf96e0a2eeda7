"""Soak test of emo-serve: many clients for a bounded time, with cancellations and
mixed profiles; prints errors, latency percentiles, resident-memory drift, and
whether greedy outputs under load equal the same requests on an idle server.

    flock /tmp/emo-bench.lock python benchmarks/soak.py --duration 180
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID   # a server already running

Without --url it starts `emo-serve` itself (the bundled demo unless --model is
given) with --server-args. Each client loops until the deadline, picking:

- greedy: a fixed probe (prompt, profile), temperature 0, compared with the
  answer the idle server gave before the load started;
- sampled: a stream with random temperature/top_p/top_k/penalties and profile;
- chat: a chat completion;
- routing: POST /v1/routing over a prompt (any profile, auto included);
- return_routing: a greedy completion that asks for its routing summary;
- cancel: a stream dropped after its first events, or a request whose client
  gives up after a random short timeout (its work must be cancelled, not leak).

Errors are 5xx answers, error events inside streams, and transport failures;
a 4xx is also an error here (every request the soak sends is valid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "def fibonacci(n):\n", "import os\nimport sys\n\ndef main(", "class Stack:\n    def __init__(self):\n",
    "#include <stdio.h>\n\nint main(void) {\n", "static int compare(const void *a, const void *b) {\n",
    "The history of the city begins", "Once upon a time, in a small village,", "12 + 30 = 42\n7 * 6 = ",
    "100 - 58 = ", "for (int i = 0; i < n; i++) {\n", "    return self.items.pop()\n", "In summary, the results",
]
PROFILES = ["python", "c", "prose", "arith", "full", "auto"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Soak:
    def __init__(self, url: str, model: str, profiles: list[str], max_tokens: int, seed: int):
        self.url, self.model, self.profiles, self.max_tokens = url, model, profiles, max_tokens
        self.rng = random.Random(seed)
        # greedy probes include auto: its choice must not depend on the load either
        self.probes = [(p, prof) for p in PROMPTS[:8] for prof in dict.fromkeys([*profiles[:4], "auto"])]
        self.idle: dict[tuple[str, str], str] = {}
        self.latency: dict[str, list[float]] = {k: [] for k in ("greedy", "sampled", "chat", "routing")}
        self.ttft: list[float] = []
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.mismatches: list[tuple[str, str]] = []
        self.tokens = 0

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def error(self, what: str) -> None:
        self.count("errors")
        if len(self.errors) < 20:
            self.errors.append(what[:300])

    def greedy_body(self, prompt: str, profile: str) -> dict:
        return {"model": f"{self.model}:{profile}", "prompt": prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True}

    async def record_idle(self, client: httpx.AsyncClient) -> None:
        for prompt, prof in self.probes:
            r = await client.post("/v1/completions", json=self.greedy_body(prompt, prof))
            r.raise_for_status()
            self.idle[(prompt, prof)] = r.json()["choices"][0]["text"]

    async def greedy(self, client: httpx.AsyncClient) -> None:
        prompt, prof = self.rng.choice(self.probes)
        t0 = time.monotonic()
        r = await client.post("/v1/completions", json=self.greedy_body(prompt, prof))
        if r.status_code != 200:
            return self.error(f"greedy {r.status_code}: {r.text}")
        self.latency["greedy"].append(time.monotonic() - t0)
        body = r.json()
        self.tokens += body["usage"]["completion_tokens"]
        self.count("greedy")
        if body["choices"][0]["text"] != self.idle[(prompt, prof)]:
            self.mismatches.append((prompt, prof))

    async def sampled(self, client: httpx.AsyncClient, cancel_after: int | None = None) -> None:
        rng = self.rng
        body = {"model": self.model, "profile": rng.choice(self.profiles), "prompt": rng.choice(PROMPTS),
                "max_tokens": rng.randint(8, self.max_tokens * 2), "temperature": rng.choice([0.3, 0.7, 1.0, 1.3]),
                "top_p": rng.choice([1.0, 0.9, 0.5]), "top_k": rng.choice([0, 20, 100]),
                "frequency_penalty": rng.choice([0, 0.5]), "seed": rng.randint(0, 2 ** 31), "stream": True,
                "n": rng.choice([1, 1, 2]), "stream_options": {"include_usage": True}}
        t0 = time.monotonic()
        events = 0
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return self.error(f"stream {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    return self.error(f"stream error event: {obj['error']}")
                if events == 0:
                    self.ttft.append(time.monotonic() - t0)
                events += 1
                if obj.get("usage"):
                    self.tokens += obj["usage"]["completion_tokens"]
                if cancel_after is not None and events >= cancel_after:
                    self.count("cancelled")
                    return  # leaving the context manager closes the connection mid-stream
        self.latency["sampled"].append(time.monotonic() - t0)
        self.count("sampled")

    async def chat(self, client: httpx.AsyncClient) -> None:
        body = {"model": f"{self.model}:{self.rng.choice(self.profiles)}", "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}], "temperature": 0.5}
        t0 = time.monotonic()
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code == 400 and "chat template" in r.text:
            self.count("chat-unsupported")
            return
        if r.status_code != 200:
            return self.error(f"chat {r.status_code}: {r.text}")
        self.latency["chat"].append(time.monotonic() - t0)
        self.tokens += r.json()["usage"]["completion_tokens"]
        self.count("chat")

    async def routing(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "profile": self.rng.choice(self.profiles), "prompt": self.rng.choice(PROMPTS) * 4}
        t0 = time.monotonic()
        r = await client.post("/v1/routing", json=body)
        if r.status_code != 200:
            return self.error(f"routing {r.status_code}: {r.text}")
        self.latency["routing"].append(time.monotonic() - t0)
        self.count("routing")

    async def return_routing(self, client: httpx.AsyncClient) -> None:
        prompt, prof = self.rng.choice(self.probes)
        r = await client.post("/v1/completions", json={**self.greedy_body(prompt, prof), "return_routing": True})
        if r.status_code != 200:
            return self.error(f"return_routing {r.status_code}: {r.text}")
        body = r.json()
        self.tokens += body["usage"]["completion_tokens"]
        self.count("return_routing")
        if not body["choices"][0]["routing"]["layers"]:
            self.error("return_routing: an empty routing summary")
        if body["choices"][0]["text"] != self.idle[(prompt, prof)]:
            self.mismatches.append((prompt, prof))

    async def give_up(self, client: httpx.AsyncClient) -> None:
        body = {**self.greedy_body(*self.rng.choice(self.probes)), "max_tokens": self.max_tokens * 3}
        try:
            await client.post("/v1/completions", json=body, timeout=self.rng.uniform(0.05, 1.0))
            self.count("give-up-finished")
        except httpx.TimeoutException:
            self.count("cancelled")

    async def client_loop(self, deadline: float, cancel_share: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            while time.monotonic() < deadline:
                x = self.rng.random()
                try:
                    if x < cancel_share / 2:
                        await self.sampled(client, cancel_after=self.rng.randint(1, 4))
                    elif x < cancel_share:
                        await self.give_up(client)
                    elif x < 0.40:
                        await self.greedy(client)
                    elif x < 0.70:
                        await self.sampled(client)
                    elif x < 0.80:
                        await self.chat(client)
                    elif x < 0.90:
                        await self.routing(client)
                    else:
                        await self.return_routing(client)
                except httpx.HTTPError as e:
                    self.error(f"transport: {type(e).__name__}: {e}")


async def run(args, url: str, pid: int | None) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        models = (await c.get("/v1/models")).json()["data"]
    base = models[0]["id"]
    hosted = [m["profile"] for m in models if m["id"].startswith(base + ":") and m["profile"] not in ("full", "auto")]
    profiles = hosted + ["full", "auto"] if hosted else ["full"]
    soak = Soak(url, base, profiles, args.max_tokens, args.seed)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await soak.record_idle(c)
    print(f"idle: {len(soak.idle)} greedy probes recorded in {time.monotonic() - t0:.1f} s "
          f"(profiles {', '.join(profiles)})", flush=True)
    rss0 = rss_bytes(pid) if pid else None
    start = time.monotonic()
    deadline = start + args.duration
    rss_samples: list[tuple[float, int]] = []

    async def sample_rss() -> None:
        while time.monotonic() < deadline and pid:
            rss_samples.append((time.monotonic() - start, rss_bytes(pid)))
            await asyncio.sleep(5)

    await asyncio.gather(sample_rss(), *(soak.client_loop(deadline, args.cancel_share) for _ in range(args.clients)))
    wall = time.monotonic() - start
    # after the load: nothing left running, and the idle answers again
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        for _ in range(50):
            h = (await c.get("/health")).json()
            if h["running"] == 0 and h["waiting"] == 0:
                break
            await asyncio.sleep(0.2)
        after = {}
        for prompt, prof in soak.probes:
            r = await c.post("/v1/completions", json=soak.greedy_body(prompt, prof))
            after[(prompt, prof)] = r.json()["choices"][0]["text"] if r.status_code == 200 else None
    rss1 = rss_bytes(pid) if pid else None

    n_greedy = len(soak.latency["greedy"])
    print(f"\nsoak: {args.clients} clients, {wall:.0f} s, cancel share {args.cancel_share:.0%}")
    print("requests: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.counts.items())))
    print(f"generated tokens: {soak.tokens} ({soak.tokens / wall:.1f} tok/s over the run)")
    for k, xs in soak.latency.items():
        if xs:
            print(f"latency {k:8s}: n={len(xs):5d}  p50 {percentile(xs, 50):6.2f} s  p99 {percentile(xs, 99):6.2f} s  "
                  f"max {max(xs):6.2f} s")
    if soak.ttft:
        print(f"time to first token (streams): p50 {percentile(soak.ttft, 50):.2f} s  "
              f"p99 {percentile(soak.ttft, 99):.2f} s")
    print(f"errors: {soak.counts.get('errors', 0)}")
    for e in soak.errors:
        print("  ", e)
    print(f"greedy under load equal to idle: {n_greedy - len(soak.mismatches)}/{n_greedy}"
          + (f"  MISMATCHES: {sorted(set(soak.mismatches))[:5]}" if soak.mismatches else ""))
    same_after = sum(after[k] == soak.idle[k] for k in soak.idle)
    print(f"greedy after the load equal to idle: {same_after}/{len(soak.idle)}")
    if rss0 and rss1:
        mid = [r for t, r in rss_samples if t >= wall * 0.2]
        base_rss = mid[0] if mid else rss0
        print(f"RSS: before load {rss0 / 2**20:.0f} MiB, at 20% of the run {base_rss / 2**20:.0f} MiB, after "
              f"{rss1 / 2**20:.0f} MiB (drift from 20%: {100 * (rss1 - base_rss) / base_rss:+.1f}%, from start "
              f"{100 * (rss1 - rss0) / rss0:+.1f}%); max {max(r for _, r in rss_samples) / 2**20:.0f} MiB")
        print("RSS samples (s: MiB): " + " ".join(f"{t:.0f}:{r / 2**20:.0f}" for t, r in rss_samples))
    bad = soak.counts.get("errors", 0) or soak.mismatches or same_after != len(soak.idle)
    return 1 if bad else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start emo-serve here)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for its resident memory")
    p.add_argument("--model", help="emo-serve --model (default: the bundled demo with its profiles)")
    p.add_argument("--server-args", default="", help="more emo-serve arguments, one string")
    p.add_argument("--duration", type=float, default=180, help="seconds of load (default 180)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--cancel-share", type=float, default=0.15, help="share of requests cancelled (default 0.15)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per greedy probe (default 32)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    proc = None
    url, pid = args.url, args.pid
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--log-level", "warning",
               *(["--model", args.model] if args.model else []), *args.server_args.split()]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                sys.exit("soak: the server did not start")
            time.sleep(0.2)
        print(f"server: {' '.join(cmd[1:])} (pid {pid})")
    try:
        rc = asyncio.run(run(args, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    sys.exit(rc)


if __name__ == "__main__":
    main()
