"""Qwen3-30B-A3B-shaped benchmark (issue 9): build a 32-expert profile, then serve it.

Writes (once, into --dir) a Qwen3-MoE checkpoint of Qwen3-30B-A3B's shape with
random bf16 weights: hidden 2048, 32 query / 4 kv heads of 128, 128 experts of
intermediate 768, top-8 (renormalised), vocab 151936, --layers layers (the
release has 48; 12 layers are ~16 GB on disk). Then, in one run, each part in a
fresh process so resident memory is clean:

  a) `emo-subset build --keep 32 --method random`: wall time and peak RSS
     (ru_maxrss of the process), next to the base's and the profile's size
  b) single-sequence prefill and decode tokens/s of the profile: emo-serve's
     model core (eager, run before and after transformers since the cores are
     shared, and with --compile's GEMV) and transformers (AutoModelForCausalLM
     on the same folder, a stock Qwen3-MoE checkpoint), bf16, --threads
     threads, with RSS
  c) llama.cpp's llama-bench on the profile exported with `emo-subset
     export-gguf` when a llama-bench binary is given or found (--llama-bench,
     default: /work/llama-build/llama.cpp/build/bin/llama-bench); otherwise it says so
  d) the memory-bandwidth floor: bytes read per decoded token / copy bandwidth

Usage: flock /tmp/emo-bench.lock python benchmarks/bench_qwen3.py --dir /tmp/emo-bench-families [--layers 12]
Prints a table; --json FILE also writes the figures.
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

from bench_model import _time_decode, child_bandwidth, rss_bytes, run_llama_bench, run_script_child  # noqa: E402

H, HEADS, KV, D, E, I, K, V = 2048, 32, 4, 128, 128, 768, 8, 151936
KEEP = 32


def config(layers: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D, "num_hidden_layers": layers,
            "num_experts": E, "num_experts_per_tok": K, "moe_intermediate_size": I, "intermediate_size": 6144,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": V,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
            "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
            "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": None}


def write_base(folder: Path, layers: int) -> Path:
    """Random bf16 weights, generated and written one tensor at a time (never the whole model in RAM)."""
    import torch

    from modeling.io.safetensors_io import write_checkpoint
    from tests.checkpoints import write_tokenizer

    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config(layers):
        return folder
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def tensors():
        yield "model.embed_tokens.weight", rnd(V, H, scale=1.0)
        for i in range(layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (1 + rnd(H, scale=0.1))
            yield f"{p}.post_attention_layernorm.weight", (1 + rnd(H, scale=0.1))
            yield f"{p}.self_attn.q_proj.weight", rnd(HEADS * D, H)
            yield f"{p}.self_attn.k_proj.weight", rnd(KV * D, H)
            yield f"{p}.self_attn.v_proj.weight", rnd(KV * D, H)
            yield f"{p}.self_attn.o_proj.weight", rnd(H, HEADS * D)
            yield f"{p}.self_attn.q_norm.weight", (1 + rnd(D, scale=0.1))
            yield f"{p}.self_attn.k_norm.weight", (1 + rnd(D, scale=0.1))
            yield f"{p}.mlp.gate.weight", rnd(E, H, scale=0.5)
            for j in range(E):
                yield f"{p}.mlp.experts.{j}.gate_proj.weight", rnd(I, H)
                yield f"{p}.mlp.experts.{j}.up_proj.weight", rnd(I, H)
                yield f"{p}.mlp.experts.{j}.down_proj.weight", rnd(H, I)
        yield "model.norm.weight", (1 + rnd(H, scale=0.1))
        yield "lm_head.weight", rnd(V, H)

    t0 = time.perf_counter()
    write_checkpoint(folder, config(layers), tensors(), max_shard_bytes=2 * 1000**3, force=True)
    write_tokenizer(folder, 1000)  # a small BPE (llama.cpp wants one inside the GGUF); speed uses token ids
    print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder


# -- parts, each in a fresh interpreter ---------------------------------------------------


def child_write(folder: str, layers: int) -> dict:
    write_base(Path(folder), layers)
    return {}


def time_greedy(m, ids: list[int], n_decode: int) -> tuple[float, float]:
    """Prefill `ids` then greedy-decode `n_decode` tokens through one cache slot of model-core `m`:
    (prefill tok/s, decode tok/s). Shared by the benchmark scripts."""
    import torch

    from modeling import Batch

    cache = m.new_cache(1, len(ids) + n_decode + 8)
    state = {"tok": 5}

    def prefill():
        state["tok"] = int(m.forward(Batch(torch.tensor(ids), [0], [0], [len(ids)]), cache).logits[0].argmax())

    def step():
        out = m.forward(Batch(torch.tensor([state["tok"]]), [0], [cache.lengths[0]], [1]), cache)
        state["tok"] = int(out.logits[0].argmax())

    return _time_decode(step, prefill, len(ids), n_decode)


def child_ours(path: str, threads: int, n_prompt: int, n_decode: int, compile: int = 0) -> dict:
    import torch

    torch.set_num_threads(threads)
    bare = rss_bytes()
    from modeling import Batch, load_model

    t0 = time.perf_counter()
    m = load_model(path, compile=bool(compile))
    load_s = time.perf_counter() - t0
    if compile:  # compile every decode shape before timing (cached by Inductor afterwards)
        cache = m.new_cache(1, 8)
        for pos, t in enumerate([1000, 1001]):
            m.forward(Batch(torch.tensor([t]), [0], [pos], [1]), cache)
    ids = list(range(1000, 1000 + n_prompt))
    m.logits(ids[:64])  # warm-up: both contenders start from the page cache
    pf, dc = time_greedy(m, ids, n_decode)
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "load_s": load_s, "rss": rss_bytes(), "bare_rss": bare}


def child_hf(path: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    bare = rss_bytes()
    import transformers

    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    ids = torch.arange(1000, 1000 + n_prompt)[None]
    with torch.no_grad():
        m(ids[:, :64])
        state = {}

        def prefill():
            out = m(ids, use_cache=True)
            state["pkv"], state["tok"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            out = m(state["tok"], past_key_values=state["pkv"], use_cache=True)
            state["pkv"], state["tok"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        pf, dc = _time_decode(step, prefill, n_prompt, n_decode)
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "load_s": load_s, "rss": rss_bytes(), "bare_rss": bare}


def run_child(kind: str, *args) -> dict:
    return run_script_child(__file__, kind, *args)


def build_profile(base: Path, out: Path, threads: int, keep: int = KEEP) -> dict:
    """`emo-subset build --keep KEEP --method random`: wall time, the build's own peak RSS, profile bytes."""
    cmd = [sys.executable, "-m", "subsetting.cli", "build", str(base), "--out", str(out), "--keep", str(keep),
           "--method", "random", "--threads", str(threads), "--force", "--json", "-q"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out_text = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"emo-subset build failed:\n{err[-3000:]}")
    summ = json.loads(out_text)
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "profile_bytes": summ["bytes"]["total"]}


def export(profile: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "subsetting.cli", "export-gguf", str(profile), "--out", str(out), "--force",
           "--json", "-q"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise RuntimeError(f"emo-subset export-gguf failed:\n{p.stderr[-3000:]}")
    return {**json.loads(p.stdout), "wall_s": time.perf_counter() - t0}


def bytes_per_decoded_token(layers: int) -> int:
    attn = (2 * HEADS * D * H + 2 * KV * D * H) * 2
    experts = K * 3 * H * I * 2
    router = KEEP * H * 2
    return layers * (attn + experts + router) + V * H * 2 + H * 2  # + lm_head + one embedding row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench-families", help="where the checkpoints go (~22 GB for 12 layers)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="no row for load_model(compile=True)")
    ap.add_argument("--llama-bench", default="/work/llama-build/llama.cpp/build/bin/llama-bench")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"ours": child_ours, "hf": child_hf, "bandwidth": child_bandwidth, "write": child_write}[kind]
        conv = {"bandwidth": [int], "write": [str, int]}.get(kind, [str] + [int] * 4)
        print(json.dumps(fn(*[c(x) for c, x in zip(conv, rest)])))
        return

    root = Path(args.dir)
    base = root / f"qwen3-30b-a3b-shape-{args.layers}l"
    # in a child: a parent grown by writing 16 GB would count in the build child's ru_maxrss (fork copies it)
    run_child("write", base, args.layers)
    prof = root / f"qwen3-{args.layers}l-keep{KEEP}"
    res: dict = {"layers": args.layers, "threads": args.threads, "prompt": args.prompt, "decode": args.decode,
                 "base_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}
    res["build"] = build_profile(base, prof, args.threads)
    print(f"build: {res['build']}", file=sys.stderr)
    # ours before and after transformers: the cores are shared, so the spread shows the noise
    res["ours"] = run_child("ours", prof, args.threads, args.prompt, args.decode)
    print(f"ours: {res['ours']}", file=sys.stderr)
    if not args.skip_hf:
        res["transformers"] = run_child("hf", prof, args.threads, args.prompt, args.decode)
        print(f"transformers: {res['transformers']}", file=sys.stderr)
    res["ours (again)"] = run_child("ours", prof, args.threads, args.prompt, args.decode)
    if not args.skip_compile:
        res["ours --compile"] = run_child("ours", prof, args.threads, args.prompt, args.decode, 1)
    if args.llama_bench and Path(args.llama_bench).is_file():
        gg = root / f"qwen3-{args.layers}l-keep{KEEP}.gguf"
        res["gguf_export"] = export(prof, gg)
        res["llama.cpp"] = run_llama_bench(args.llama_bench, str(gg), args.threads, args.prompt, args.decode)
    else:
        res["llama.cpp"] = f"not run: no llama-bench at {args.llama_bench} (benchmarks/build_llama_cpp.sh builds one)"
    res["bandwidth"] = run_child("bandwidth", args.threads)
    res["bytes_per_decoded_token"] = bytes_per_decoded_token(args.layers)
    floor = res["bandwidth"]["copy_GBps"] * 1e9 / res["bytes_per_decoded_token"]

    gb = 1e9
    b = res["build"]
    print(f"\nQwen3-30B-A3B shape, {args.layers} layers, random bf16; {args.threads} threads; "
          f"prompt {args.prompt}, decode {args.decode}")
    print(f"base {res['base_bytes'] / gb:.2f} GB -> {KEEP}-expert profile {b['profile_bytes'] / gb:.2f} GB: "
          f"built in {b['wall_s']:.1f} s, peak RSS {b['peak_rss'] / gb:.2f} GB")
    print("| engine | prefill tok/s | decode tok/s | load s | RSS GB |")
    print("|---|---|---|---|---|")
    for key in ("ours", "ours (again)", "ours --compile", "transformers", "llama.cpp"):
        r = res.get(key)
        if isinstance(r, dict):
            print(f"| {key} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r.get('load_s', float('nan')):.1f} "
                  f"| {r['rss'] / gb:.2f} |")
        elif r:
            print(f"| {key} | {r} |")
    if isinstance(res.get("transformers"), dict):
        o, t = res["ours"], res["transformers"]
        print(f"ours / transformers: prefill x{o['prefill_tok_s'] / t['prefill_tok_s']:.2f}, "
              f"decode x{o['decode_tok_s'] / t['decode_tok_s']:.2f}")
    print(f"bandwidth floor: {res['bytes_per_decoded_token'] / gb:.2f} GB per decoded token at "
          f"{res['bandwidth']['copy_GBps']:.1f} GB/s copy = {floor:.2f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
