"""The cost of grammar-constrained decoding per generated token, at batch 1 and
16, against decode time: the server's own engine (in process, no HTTP), the
bundled demo model on one profile, the same requests with and without a JSON
schema, side by side in one run.

    flock /tmp/emo-bench.lock python benchmarks/bench_structured.py

Columns: milliseconds per engine step (B sequences, one token each; every
sequence runs exactly --max-tokens steps), free and with every sequence
constrained to a JSON schema, the mask's own compute time per token (llguidance, on the
worker threads: overlapped with the forward pass) and the time the sampler
waited for a mask (what the overlap did not hide), and the overhead ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# as emo-serve does: idle OpenMP threads sleep (spinning ones fight the grammar worker for the cores)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# an output longer than --max-tokens (at least 200 integers): constrained and free sequences all run exactly
# max_tokens steps, so the two columns time the same work but the mask
SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "minItems": 200,
                                                      "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
          "required": ["values"], "additionalProperties": False}


def run(state, batch: int, constrained: bool, max_tokens: int, seed: int) -> dict:
    from modeling import SamplingParams
    from server.engine import Sequence
    from server.structured_outputs import checked, compiler_for, constraint

    model = state.registry.model
    tok = model.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Numbers, please."}]))
    grammar = checked(model, compiler_for(model).json_schema(SCHEMA), "schema") if constrained else None
    done = threading.Semaphore(0)
    tokens = [0] * batch

    def sink(i):
        def f(ev):
            tokens[i] += len(ev.tokens)
            if ev.finish_reason or ev.error:
                done.release()
        return f

    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i, ignore_eos=not constrained,
                             constraint=constraint(model, grammar)) for i in range(batch)]
    seqs = [Sequence(prompt, p, "python", sink(i)) for i, p in enumerate(params)]
    steps0 = state.engine.steps
    t0 = time.perf_counter()
    state.engine.submit(seqs)
    for _ in seqs:
        done.acquire()
    wall = time.perf_counter() - t0
    n = sum(tokens)
    assert n == batch * max_tokens, (n, batch, max_tokens)  # every sequence ran its whole budget
    out = {"batch": batch, "constrained": constrained, "tokens": n, "wall_s": wall,
           "steps": state.engine.steps - steps0, "ms_per_step": 1e3 * wall / (state.engine.steps - steps0)}
    if constrained:
        out["mask_ms_per_token"] = 1e3 * sum(p.constraint.mask_seconds for p in params) / n
        out["wait_ms_per_token"] = 1e3 * sum(p.constraint.wait_seconds for p in params) / n
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    from server.app import build_state
    from server.config import ServerConfig

    state = build_state(ServerConfig(max_batch=16))
    state.engine.start()
    run(state, 2, True, 16, 0)  # warm-up: first forward, first grammar
    rows = []
    for batch in (1, 16):
        # free and constrained runs alternate, so that a busy neighbour slows both alike; best of the repeats
        runs = [run(state, batch, c, args.max_tokens, 100 * r) for r in range(args.repeats) for c in (False, True)]
        for c in (False, True):
            rows.append(min((r for r in runs if r["constrained"] == c), key=lambda r: r["ms_per_step"]))
    state.engine.stop()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"demo model, profile python, {args.threads} threads, {args.max_tokens} tokens per sequence; best of "
          f"{args.repeats}")
    print(f"{'batch':>5} {'free ms/step':>13} {'json ms/step':>13} {'overhead':>9} {'mask ms/token':>14} "
          f"{'waited ms/token':>16}")
    for free, cons in zip(rows[::2], rows[1::2]):
        print(f"{free['batch']:>5} {free['ms_per_step']:>13.2f} {cons['ms_per_step']:>13.2f} "
              f"{cons['ms_per_step'] / free['ms_per_step']:>8.2f}x {cons['mask_ms_per_token']:>14.3f} "
              f"{cons['wait_ms_per_token']:>16.3f}")


if __name__ == "__main__":
    main()
