"""Scale benchmark (not CI): a 32-of-128 profile from a 16-layer EMO-shaped random
bf16 checkpoint of about 28 GB, more than this machine's RAM.

    python benchmarks/bench_subset_scale.py /big/folder [--keep 32] [--skip-generate]

1. writes the random checkpoint shard by shard with bounded memory (expert
   weights are views of one 256 MB random pool at random offsets);
2. drops its pages from the page cache (posix_fadvise DONTNEED) and runs
   `emo-subset build --corpus ... --keep 32` in a child process (calibration
   pass layer by layer + streaming writer), then `--experts-file` (writer only);
3. reports the child's peak RSS (getrusage of children = VmHWM) and wall time next
   to the time needed merely to read the kept bytes (cold cache, through the
   same mapped reader), and the disk's throughput for the whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeling import CheckpointFiles, TensorNames, load_config  # noqa: E402
from modeling.io.safetensors_io import ShardedWriter  # noqa: E402

CONFIG = {
    "model_type": "emo", "architectures": ["EmoForCausalLM"], "vocab_size": 100352, "hidden_size": 2048,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128,
    "intermediate_size": 1024, "num_experts": 128, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "norm_topk_prob": False, "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "eos_token_id": 100257, "pad_token_id": 100277, "torch_dtype": "bfloat16",
}


def generate(folder: Path, layers: int) -> None:
    from tests.checkpoints import write_tokenizer

    cfg = dict(CONFIG, num_hidden_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(64 * 1024 * 1024, generator=g) * 0.02).to(torch.bfloat16)  # 128 MB
    H, I, V, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_experts"]
    n = TensorNames("emo")

    def view(*shape):
        size = 1
        for s in shape:
            size *= s
        off = int(torch.randint(0, pool.numel() - size, (1,), generator=g))
        return pool[off:off + size].view(*shape)

    w = ShardedWriter(folder, 2 * 1000**3)
    w.add(n.embed, torch.randn(V, H, generator=g).to(torch.bfloat16))  # 0.4 GB, scale ~1
    for i in range(layers):
        w.add(n.attn_norm(i), torch.ones(H, dtype=torch.bfloat16))
        for p in "qkvo":
            w.add(n.proj(i, p), view(H, H))
        w.add(n.mlp_norm(i), torch.ones(H, dtype=torch.bfloat16))
        w.add(n.router(i), (torch.randn(E, H, generator=g) * 0.05).to(torch.bfloat16))
        for j in range(E):
            for name, shape in zip(n.expert_tensor_names(i, j), ((I, H), (I, H), (H, I))):
                w.add(name, view(*shape))
        print(f"  generated layer {i}", file=sys.stderr, flush=True)
    w.add(n.final_norm, torch.ones(H, dtype=torch.bfloat16))
    w.add(n.lm_head, (torch.randn(V, H, generator=g) * 0.02).to(torch.bfloat16))
    w.finish()
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(folder, 320)


def drop_cache(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_time(folder: Path, names: list[str]) -> tuple[float, int]:
    """Seconds to touch every page of `names` through the mapped reader (cold cache)."""
    drop_cache(folder)
    files = CheckpointFiles(folder)
    t0 = time.time()
    total = 0
    for name in names:
        t = files.get(name).view(-1).view(torch.uint8)
        total += t.numel()
        _ = int(t[::4096].sum())  # one byte per page: the kernel reads every page
        files.release([name])
    return time.time() - t0, total


def run_child(cmd: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, the child's own peak RSS in GiB (wait4's ru_maxrss = VmHWM), its JSON summary."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.time()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.time() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if p.returncode:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 1024**2, json.loads(out.read())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="scratch folder (needs about 36 GB free)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", type=int, default=32)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--cleanup", action="store_true", help="remove the checkpoint and profiles at the end")
    a = ap.parse_args()
    folder = Path(a.folder)
    src, corpus = folder / "emo-random-28gb", folder / "calib.jsonl"
    if not a.skip_generate or not (src / "config.json").is_file():
        t0 = time.time()
        generate(src, a.layers)
        print(f"generated {src} in {time.time() - t0:.1f} s", file=sys.stderr)
    files = CheckpointFiles(src)
    total_bytes = files.total_bytes()
    from tests.checkpoints import TOKENIZER_TEXT
    lines = TOKENIZER_TEXT.splitlines()
    corpus.write_text("\n".join(json.dumps({"text": " ".join(lines[i % len(lines):] + lines)[:1500], "domain": "x"})
                                for i in range(a.docs)))
    exe = [sys.executable, "-m", "subsetting.cli"]
    out1, out2 = folder / "profile-meanprob", folder / "profile-file"
    drop_cache(src)
    wall1, rss1, s1 = run_child(exe + ["build", str(src), "--out", str(out1), "--corpus", str(corpus), "--keep",
                                       str(a.keep), "--max-tokens", "128", "--force", "--json", "--quiet"])
    kept = json.loads((out1 / "profile.json").read_text())["kept_experts"]
    (folder / "experts.json").write_text(json.dumps(kept))
    shutil.rmtree(out1)  # disk: the second build writes the same bytes again
    drop_cache(src)
    wall2, rss2, s2 = run_child(exe + ["build", str(src), "--out", str(out2), "--experts-file",
                                       str(folder / "experts.json"), "--force", "--json", "--quiet"])
    cfg = load_config(src)
    n = TensorNames("emo")
    expert_names = {x for i in range(cfg.num_layers) for j in range(cfg.experts_per_layer[i])
                    for x in n.expert_tensor_names(i, j)}
    kept_names = [x for x in files.names() if x not in expert_names] + [
        x for i, ids in kept.items() for j in ids for x in n.expert_tensor_names(int(i), j)]
    t_read, kept_bytes = read_time(src, kept_names)
    t_all, _ = read_time(src, files.names())
    res = {
        "checkpoint_bytes": total_bytes, "kept_bytes": kept_bytes, "profile_bytes": s1["bytes"]["total"],
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "build_with_calibration": {"wall_s": round(wall1, 1), "peak_rss_gib": round(rss1, 2),
                                   "selection_s": s1["seconds_selection"], "calibration": s1["calibration"]},
        "build_from_experts_file": {"wall_s": round(wall2, 1), "peak_rss_gib": round(rss2, 2)},
        "read_kept_bytes_s": round(t_read, 1), "read_whole_checkpoint_s": round(t_all, 1),
        "coverage_mean": sum(s1["coverage"].values()) / len(s1["coverage"]),
    }
    print(json.dumps(res, indent=1))
    if a.cleanup:
        for p in (src, out2, corpus, folder / "experts.json"):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
