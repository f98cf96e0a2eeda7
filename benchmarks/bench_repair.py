"""Repair cost (issue 20): time and peak RSS of each repair step on an OLMoE-shaped
4-layer checkpoint (hidden 2048, 64 experts of intermediate 1024, top-8, vocab
50304: OLMoE-1B-7B's shapes with 4 of its 16 layers; random bf16 weights, about
3.6 GB).

    python benchmarks/bench_repair.py --dir /tmp/emo-bench [--keep 8] [--steps 2] [--ctx 64]

Writes the checkpoint once (with the demo's tokenizer: its ids lie inside the
vocabulary), then runs `emo-subset build --keep K --repair merge,distill,finetune
--dtype bfloat16` in a child process and prints what profile.json records per
step (seconds, peak RSS of the process during the step, tokens/s) next to the
child's own peak RSS (getrusage) and the checkpoint's size. Few short steps: the
figures are the cost per step, not a useful repair of random weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, I, E, V, L, K = 2048, 1024, 64, 50304, 4, 8
CONFIG = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": V, "hidden_size": H,
          "num_hidden_layers": L, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": I,
          "num_experts": E, "num_experts_per_tok": K, "norm_topk_prob": False, "clip_qkv": None,
          "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
          "tie_word_embeddings": False, "attention_bias": False, "eos_token_id": 0, "pad_token_id": 1,
          "torch_dtype": "bfloat16"}


def write(folder: Path) -> None:
    from bench_model import random_tensors

    from modeling.io.safetensors_io import write_checkpoint

    write_checkpoint(folder, CONFIG, random_tensors(CONFIG, olmoe_names=True), max_shard_bytes=2 * 1024**3)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "modeling/bundled/stdmoe-demo" / f, folder / f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="distill and finetune steps")
    ap.add_argument("--ctx", type=int, default=64, help="tokens per training sequence (one per step)")
    ap.add_argument("--merge-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    root = Path(a.dir)
    ckpt = root / "olmoe-4l-64e"
    if not (ckpt / "config.json").is_file():
        t0 = time.time()
        write(ckpt)
        print(f"wrote {ckpt} in {time.time() - t0:.0f} s", file=sys.stderr)
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    out = root / "olmoe-4l-repaired"
    cmd = [sys.executable, "-m", "subsetting.cli", "build", str(ckpt), "--out", str(out), "--force", "--json", "-q",
           "--corpus", str(ROOT / "training/data/heldout.jsonl"), "--domain", "python", "--max-docs", "8",
           "--max-tokens", str(a.ctx), "--keep", str(a.keep), "--stability", "0", "--dtype", "bfloat16",
           "--threads", str(a.threads), "--repair", "merge,distill,finetune", "--merge-tokens", str(a.merge_tokens),
           "--distill-steps", str(a.steps), "--finetune-steps", str(a.steps), "--repair-batch", "1",
           "--repair-ctx", str(a.ctx)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"build failed:\n{p.stderr}")
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summ = json.loads(p.stdout)
    rows = [{"step": s["step"], "seconds": s["seconds"], "peak_rss_gib": round(s["peak_rss_bytes"] / 2**30, 2),
             "tokens_per_second": s.get("tokens_per_second")} for s in summ["repair"]["steps"]]
    res = {"checkpoint": str(ckpt), "checkpoint_gib": round(size / 2**30, 2), "keep": a.keep, "steps": a.steps,
           "ctx": a.ctx, "threads": a.threads, "build_seconds": round(wall, 1),
           "child_peak_rss_gib": round(child_peak / 2**30, 2), "repair": rows}
    print(f"OLMoE-shaped 4-layer checkpoint, {size / 2**30:.2f} GiB bf16; keep {a.keep} of {E}; "
          f"{a.steps} steps of 1 x {a.ctx} tokens; {a.threads} threads")
    print("| step | seconds | peak RSS (GiB) | tokens/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} | {r['tokens_per_second'] or '-'} |")
    print(f"whole build (calibration, selection, repair, writing): {wall:.0f} s, peak RSS "
          f"{child_peak / 2**30:.2f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
