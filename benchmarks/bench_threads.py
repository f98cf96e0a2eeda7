"""Decode and prefill speed by intra-op thread count and OpenMP wait policy, on a
quiet machine and next to a busy neighbour (another torch process running a
bounded matmul loop with its default threads), side by side in one run.

    flock /tmp/emo-bench.lock python benchmarks/bench_threads.py

Each row runs in a fresh process (OMP_WAIT_POLICY is read once, when the
OpenMP runtime starts). The model is the bundled demo, or --model; with
--hidden a synthetic EMO checkpoint of that width is written under /tmp.
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
BUNDLED = ROOT / "modeling" / "bundled" / "emo-demo"

NEIGHBOUR = """
import time, torch
a = torch.randn(512, 512); b = torch.randn(512, 512)
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    for _ in range(20):
        a @ b
"""


def child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from modeling import SamplingParams, load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prompt = list(range(10, 10 + args.prompt))
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    model.generate(prompt[:8], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    best_decode, best_prefill = 0.0, 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.logits(prompt)
        best_prefill = max(best_prefill, len(prompt) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        g = model.generate(prompt[:8], params)
        best_decode = max(best_decode, len(g.token_ids) / (time.perf_counter() - t0))
    print(json.dumps({"decode": best_decode, "prefill": best_prefill}))


def run_row(model: str, threads: int, policy: str | None, busy: bool, args) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy and policy.startswith("spin:"):  # libgomp: spin this many times before sleeping
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    neighbour = None
    if busy:
        nenv = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR.format(seconds=600)], env=nenv)
        time.sleep(2)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--model", model, "--threads", str(threads),
                              "--tokens", str(args.tokens), "--prompt", str(args.prompt), "--repeats",
                              str(args.repeats)], env=env, capture_output=True, text=True, timeout=900)
    finally:
        if neighbour is not None:
            neighbour.terminate()
            neighbour.wait()
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=str(BUNDLED))
    p.add_argument("--hidden", type=int, help="write and use a synthetic EMO checkpoint of this hidden size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=48, help="tokens decoded per run (default 48)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for the prefill rate (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row, best kept (default 3)")
    p.add_argument("--policies", default="default,PASSIVE",
                   help="OpenMP wait settings, comma-separated: default, PASSIVE, ACTIVE or spin:N "
                        "(GOMP_SPINCOUNT=N) (default %(default)s)")
    p.add_argument("--thread-counts", help="intra-op thread counts to try, comma-separated (default: 1 and the "
                   "CPUs usable)")
    args = p.parse_args()
    if args.child:
        return child(args)
    model = args.model
    if args.hidden:
        sys.path.insert(0, str(ROOT))
        from tests.checkpoints import emo_config, write_checkpoint_dir

        model = f"/tmp/emo-bench-threads/emo-h{args.hidden}"
        if not Path(model, "config.json").is_file():
            write_checkpoint_dir(Path(model), emo_config(hidden_size=args.hidden, intermediate_size=args.hidden // 2,
                                                         num_experts=32, num_experts_per_tok=4, num_hidden_layers=8,
                                                         num_attention_heads=8, num_key_value_heads=8,
                                                         head_dim=args.hidden // 8, max_position_embeddings=512,
                                                         vocab_size=8192))
    ncpu = len(os.sched_getaffinity(0))
    print(f"model {model}; {ncpu} CPUs usable; decode {args.tokens} tokens, prefill {args.prompt}; best of "
          f"{args.repeats}")
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} {'neighbour':>9} {'decode tok/s':>12} {'prefill tok/s':>13}")
    policies = [None if x == "default" else x for x in args.policies.split(",")]
    counts = sorted({int(x) for x in args.thread_counts.split(",")}) if args.thread_counts else sorted({1, ncpu})
    rows = {}
    for busy in (False, True):
        for threads in counts:
            for policy in policies:
                r = run_row(model, threads, policy, busy, args)
                rows[(busy, threads, policy)] = r
                print(f"{threads:>7} {policy or '(default)':>15} {'busy' if busy else 'idle':>9} "
                      f"{r['decode']:12.1f} {r['prefill']:13.1f}", flush=True)
    print("\nslowdown next to the busy neighbour (idle / busy), decode and prefill:")
    for threads in counts:
        for policy in policies:
            a, b = rows[(False, threads, policy)], rows[(True, threads, policy)]
            print(f"  {threads} thread(s), {policy or 'default policy'}: decode {a['decode'] / b['decode']:.2f}x, "
                  f"prefill {a['prefill'] / b['prefill']:.2f}x")


if __name__ == "__main__":
    main()
