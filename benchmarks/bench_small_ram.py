"""A model larger than the memory it is given (issue 17): a 25% profile of an EMO-shaped checkpoint of
~6.9 GiB served in a memory cgroup of --limit (3 GiB by default) from a cold page cache, after a `full`
request has paged in every layer, against the same with all the machine's RAM. Both in fresh processes,
side by side in one run.

What runs in each: load the base, merge the profile (its experts take over), one prefill of `full` (every
expert of every layer read: more than the cgroup holds), then prefill and greedy decode restricted to the
profile's experts. The page cache is dropped before each (root), so both start cold.

Needs root (cgroup v1 `memory` or v2 `memory.max`, and /proc/sys/vm/drop_caches) and ~9 GB of disk in --dir.
Usage: flock /tmp/emo-bench.lock python benchmarks/bench_small_ram.py --dir /tmp/emo-bench-small [--limit 3G]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import SHAPE, _time_decode, random_tensors, rss_bytes  # noqa: E402


def write_base(folder: Path) -> None:
    from modeling.io.safetensors_io import write_checkpoint

    if (folder / "config.json").is_file():
        return
    cfg = {"model_type": "emo", "architectures": ["EmoForCausalLM"], "num_shared_experts": 1,
           "norm_topk_prob": False, "torch_dtype": "bfloat16", **SHAPE}
    write_checkpoint(folder, cfg, random_tensors(SHAPE, False), max_shard_bytes=2 * 1024**3)


def child(base: str, profile: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from modeling import Batch, load_model

    t0 = time.perf_counter()
    m = load_model(base)
    m.add_experts_from(profile)
    kept = json.loads((Path(profile) / "profile.json").read_text())
    pool = {int(i): ids for i, ids in (kept.get("experts") or kept.get("kept_experts") or {}).items()}
    load_s = time.perf_counter() - t0
    ids = list(range(1000, 1000 + n_prompt))
    t0 = time.perf_counter()
    m.logits(ids)  # `full`: every expert of every layer is read
    full_s = time.perf_counter() - t0
    rp = m.resolve_pool(pool)
    cache = m.new_cache(1, n_prompt + n_decode + 8)
    state = {"tok": 5}

    def prefill():
        out = m.forward(Batch(torch.tensor(ids), [0], [0], [n_prompt], [rp]), cache)
        state["tok"] = int(out.logits[0].argmax())

    def step():
        out = m.forward(Batch(torch.tensor([state["tok"]]), [0], [cache.lengths[0]], [1], [rp]), cache)
        state["tok"] = int(out.logits[0].argmax())

    pf, dc = _time_decode(step, prefill, n_prompt, n_decode)
    return {"load_s": load_s, "full_prefill_s": full_s, "prefill_tok_s": pf, "decode_tok_s": dc,
            "rss": rss_bytes(), "pool_layers": len(pool)}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def cgroup(limit: int) -> tuple[Path, str]:
    """A memory cgroup of `limit` bytes (v2 memory.max, else v1 memory.limit_in_bytes): (folder, procs file)."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.is_file() and "memory" in v2.read_text():
        d = Path("/sys/fs/cgroup/emo-small-ram")
        d.mkdir(exist_ok=True)
        (d / "memory.max").write_text(str(limit))
        return d, "cgroup.procs"
    d = Path("/sys/fs/cgroup/memory/emo-small-ram")
    d.mkdir(exist_ok=True)
    (d / "memory.limit_in_bytes").write_text(str(limit))
    return d, "cgroup.procs"


def run(base: Path, prof: Path, a, cg: tuple[Path, str] | None) -> dict:
    drop_caches()
    cmd = [sys.executable, __file__, "--child", str(base), str(prof), str(a.threads), str(a.prompt), str(a.decode)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if cg is not None:  # join the cgroup first, then become the child
        procs = cg[0] / cg[1]
        cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench-small")
    ap.add_argument("--limit", default="3G", help="the cgroup's memory limit (K, M, G suffixes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        b, p, t, n, d = a.child
        print(json.dumps(child(b, p, int(t), int(n), int(d))))
        return
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    limit = int(float(a.limit[:-1]) * units[a.limit[-1].upper()]) if a.limit[-1].upper() in units else int(a.limit)
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, prof = root / "emo-4l", root / "emo-4l-keep32"
    write_base(base)
    if not (prof / "profile.json").is_file():
        subprocess.run([sys.executable, "-m", "subsetting.cli", "build", str(base), "--out", str(prof), "--keep", "32",
                        "--method", "random", "--threads", str(a.threads), "--force", "-q"], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    size = lambda f: sum(x.stat().st_size for x in f.glob("*.safetensors"))  # noqa: E731
    all_ram = run(base, prof, a, None)
    small = run(base, prof, a, cgroup(limit))
    print(f"base {size(base) / 2**30:.2f} GiB, profile {size(prof) / 2**30:.2f} GiB (32 of 128 experts), "
          f"{a.threads} threads, prompt {a.prompt}, decode {a.decode}; cold page cache before each run")
    print("| memory | load s | full prefill s | profile prefill tok/s | profile decode tok/s | RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in ((f"all RAM", all_ram), (f"cgroup {a.limit}", small)):
        print(f"| {name} | {r['load_s']:.1f} | {r['full_prefill_s']:.1f} | {r['prefill_tok_s']:.1f} | "
              f"{r['decode_tok_s']:.2f} | {r['rss'] / 2**30:.2f} |")
    print(f"decode with all RAM / in the cgroup: {all_ram['decode_tok_s'] / small['decode_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
