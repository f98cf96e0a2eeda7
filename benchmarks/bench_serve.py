"""Benchmark of emo-serve on an EMO-shaped checkpoint, measured in one run (issue 5, "Show").

1. writes (or reuses, in --workdir) a random bf16 checkpoint with the EMO
   release's shapes but --layers layers (hidden 2048, 16 heads, 128 experts of
   intermediate 1024 with 1 shared, top-8, vocab 100352), and two overlapping
   profiles built by `emo-subset build --experts-file`;
2. starts `emo-serve --profile A --profile B` as a subprocess and times
   process start -> first healthy /health;
3. aggregate generated tokens/s with 1, 4 and 16 concurrent streams (requests
   alternate between the two profiles), and time to first token;
4. RSS of the server while serving both profiles, next to the ideal
   (non-expert weights + the union of the two profiles' experts).

    python benchmarks/bench_serve.py --workdir /tmp/emo-serve-bench [--device cuda]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMO_SHAPE = {
    "model_type": "emo", "architectures": ["EmoForCausalLM"], "vocab_size": 100352, "hidden_size": 2048,
    "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 1024,
    "num_experts": 128, "num_experts_per_tok": 8, "num_shared_experts": 1, "norm_topk_prob": False,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "eos_token_id": 100257, "pad_token_id": 100277, "torch_dtype": "bfloat16",
}


def write_base(folder: Path, layers: int) -> None:
    """Random bf16 tensors streamed into shards (one layer's experts in memory at most)."""
    import torch

    from modeling import write_checkpoint
    from modeling.names import EMO_NAMES
    from tests.checkpoints import write_tokenizer

    cfg = dict(EMO_SHAPE, num_hidden_layers=layers)
    H, V, I, E = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_experts"]
    n = EMO_NAMES
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def tensors():
        yield n.embed, r(V, H, scale=1.0)
        for i in range(layers):
            yield n.attn_norm(i), torch.ones(H, dtype=torch.bfloat16)
            yield n.mlp_norm(i), torch.ones(H, dtype=torch.bfloat16)
            for p in "qkvo":
                yield n.proj(i, p), r(H, H)
            yield n.router(i), r(E, H, scale=1.0)
            for j in range(E):
                yield n.expert(i, j, "gate"), r(I, H)
                yield n.expert(i, j, "up"), r(I, H)
                yield n.expert(i, j, "down"), r(H, I)
        yield n.final_norm, torch.ones(H, dtype=torch.bfloat16)
        yield n.lm_head, r(V, H)

    tmp_tok = folder.parent / f".{folder.name}.tok"
    tmp_tok.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tmp_tok, 320)
    write_checkpoint(folder, cfg, tensors(), max_shard_bytes=1 << 30,
                     extra_files={f: tmp_tok / f for f in ("tokenizer.json", "tokenizer_config.json")})


def build_profiles(base: Path, work: Path, layers: int, keep: int, overlap: int,
                   quantize: str | None = None) -> list[Path]:
    """Two profiles of `keep` experts per layer (the shared one included) that share `overlap`
    (written quantized, compressed-tensors, with `quantize`)."""
    out = []
    for k, name in enumerate(("alpha", "beta")):
        folder = work / (name if quantize is None else f"{name}-{quantize}")
        if not (folder / "profile.json").is_file():
            start = k * (keep - 1 - overlap)
            ids = {str(i): sorted({(start + 5 * i + j) % 127 for j in range(keep - 1)}) + [127] for i in range(layers)}
            f = work / f"{name}.experts.json"
            f.write_text(json.dumps(ids))
            subprocess.run([sys.executable, "-m", "subsetting.cli", "build", str(base),
                            "--out", str(folder), "--name", folder.name, "--experts-file", str(f), "-q",
                            *(["--quantize", quantize] if quantize else [])], check=True, cwd=ROOT)
        out.append(folder)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def stream_one(url: str, profile: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total time, tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "profile": profile, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
    return ttft or float("nan"), time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/emo-serve-bench")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--keep", type=int, default=32, help="experts per layer in each profile (shared included)")
    ap.add_argument("--overlap", type=int, default=16, help="routed experts the two profiles share per layer")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per stream")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="server torch threads")
    ap.add_argument("--quantize", choices=("int8", "int4"), help="serve the profiles written quantized "
                    "(emo-subset build --quantize; compressed-tensors)")
    ap.add_argument("--mlock", action="store_true", help="start the server with --mlock")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"emo-shaped-{args.layers}l"
    t = time.perf_counter()
    if not (base / "config.json").is_file():
        print(f"writing {base} ...", flush=True)
        write_base(base, args.layers)
    profiles = build_profiles(base, work, args.layers, args.keep, args.overlap, args.quantize)
    print(f"checkpoint and profiles ready in {time.perf_counter() - t:.1f}s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "--port", str(port), "--log-level", "warning",
           "--device", args.device, "--max-batch", "16", "--max-model-len", "1024"]
    for p in profiles:
        cmd += ["--profile", str(p)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.mlock:
        cmd += ["--mlock"]
    log = (work / "server.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    figures: dict = {"device": args.device, "layers": args.layers, "profiles": [p.name for p in profiles],
                     "quantize": args.quantize}
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited: {(work / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        figures["start_to_healthy_s"] = round(time.perf_counter() - t0, 3)
        figures["rss_at_healthy_bytes"] = rss(proc.pid)
        print(f"process start -> healthy: {figures['start_to_healthy_s']:.2f}s "
              f"(RSS {figures['rss_at_healthy_bytes'] / 2**20:.0f} MiB)", flush=True)

        names = [p.name for p in profiles]
        prompt = [(7 * i + 11) % 300 + 2 for i in range(args.prompt_len)]
        stream_one(url, names[0], prompt, 2)  # warm-up: first touches of both profiles' pages
        stream_one(url, names[1], prompt, 2)
        figures["streams"] = {}
        for c in [int(x) for x in args.concurrency.split(",")]:
            jobs = [(names[i % 2], [(t + i) % 300 + 2 for t in prompt]) for i in range(c)]
            t1 = time.perf_counter()
            with cf.ThreadPoolExecutor(c) as ex:
                res = list(ex.map(lambda j: stream_one(url, j[0], j[1], args.max_tokens), jobs))
            wall = time.perf_counter() - t1
            toks = sum(r[2] for r in res)
            figures["streams"][c] = {"tokens": toks, "wall_s": round(wall, 3), "tokens_per_s": round(toks / wall, 2),
                                     "ttft_median_s": round(statistics.median(r[0] for r in res), 3),
                                     "ttft_max_s": round(max(r[0] for r in res), 3)}
            print(f"{c:2d} streams: {toks / wall:7.2f} tok/s aggregate ({toks} tokens in {wall:.2f}s), "
                  f"TTFT median {figures['streams'][c]['ttft_median_s']:.3f}s max {figures['streams'][c]['ttft_max_s']:.3f}s",
                  flush=True)
        s = figures["streams"]
        if 1 in s and 16 in s:
            figures["speedup_16_vs_1"] = round(s[16]["tokens_per_s"] / s[1]["tokens_per_s"], 2)
            print(f"16 streams / 1 stream: {figures['speedup_16_vs_1']:.2f}x (target >= 3x)")
        prof = httpx.get(url + "/v1/profiles", timeout=120).json()
        ideal = prof["non_expert_bytes"] + prof["profiles_union_expert_bytes"]
        figures["rss_serving_bytes"] = rss(proc.pid)
        figures["ideal_bytes"] = ideal
        figures["non_expert_bytes"] = prof["non_expert_bytes"]
        figures["union_expert_bytes"] = prof["profiles_union_expert_bytes"]
        figures["loaded_expert_bytes"] = prof["loaded_expert_bytes"]
        figures["profile_expert_bytes"] = {d["name"]: d["bytes"]["experts"] for d in prof["data"]}
        figures["profile_resident_bytes"] = {d["name"]: d["resident_bytes"] for d in prof["data"]}
        print(f"RSS serving both profiles: {figures['rss_serving_bytes'] / 2**20:.0f} MiB; ideal (non-expert "
              f"{prof['non_expert_bytes'] / 2**20:.0f} MiB + union of experts "
              f"{prof['profiles_union_expert_bytes'] / 2**20:.0f} MiB) = {ideal / 2**20:.0f} MiB; "
              f"ratio {figures['rss_serving_bytes'] / ideal:.3f}", flush=True)
        print(f"experts per profile: {figures['profile_expert_bytes']}; sum of the two profiles' experts "
              f"{sum(v for k, v in figures['profile_expert_bytes'].items() if k != 'full') / 2**20:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
