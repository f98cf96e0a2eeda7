"""gpt-oss-20b-shaped benchmark (issue 13): build a 16-expert profile of an MXFP4 base, then serve it.

Writes (once, into --dir) a gpt-oss checkpoint of gpt-oss-20b's shape: hidden
2880, 64 query / 8 kv heads of 64, 32 experts of intermediate 2880, top-4,
vocab 201088, sliding window 128 on every other layer, YaRN; random bf16
attention / embeddings and random MXFP4 experts (`*_blocks` / `*_scales`, as the
hub stores them), --layers of the release's 24 layers. Then, in one run, each
part in a fresh process so resident memory is clean:

  a) `emo-subset build --keep 16 --method random`: wall time, peak RSS, sizes
     (the profile keeps the base's MXFP4 bytes as they are)
  b) single-sequence prefill and decode tokens/s of the profile and RSS after
     them: emo-serve's model core (MXFP4 experts mapped, dequantized per expert
     at every use), the same with a dequantized-expert cache as large as the
     profile's experts in bf16 (`--mxfp4-cache`), the same with `--compile`
     (decode multiplies the 4-bit bytes in a fused compiled loop), and
     transformers (AutoModelForCausalLM on the same folder: on a CPU without
     triton kernels it dequantizes every MXFP4 expert to bf16 at load)

RAM: transformers holds the profile's experts in bf16 (16 x 2 x 2880 x 8640
bytes = 0.8 GB per layer) plus 2.3 GB of embeddings, so the default 8 layers
stays near 9 GB; the base is ~6 GB on disk (0.42 GB of MXFP4 per layer).

Usage: flock /tmp/emo-bench.lock python benchmarks/bench_gptoss.py --dir /tmp/emo-bench-gptoss [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import rss_bytes, run_script_child  # noqa: E402
from bench_qwen3 import build_profile, child_hf, time_greedy  # noqa: E402  (child_hf: transformers, bf16, prefill + decode)

H, HEADS, KV, D, E, I, K, V = 2880, 64, 8, 64, 32, 2880, 4, 201088
KEEP = 16


def config(layers: int) -> dict:
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": H,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D, "num_hidden_layers": layers,
            "num_local_experts": E, "num_experts_per_tok": K, "intermediate_size": I, "vocab_size": V,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "sliding_window": 128, "attention_bias": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
            "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "truncate": False,
                                                     "original_max_position_embeddings": 4096},
            "swiglu_limit": 7.0, "tie_word_embeddings": False, "eos_token_id": 200002, "pad_token_id": 199999,
            "torch_dtype": "bfloat16",
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}


def write_base(folder: Path, layers: int) -> Path:
    """Random weights, generated and written one tensor at a time (never the whole model in RAM)."""
    import torch

    from modeling.io.safetensors_io import write_checkpoint

    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config(layers):
        return folder
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def mx(rows, cols):  # random E2M1 codes; scales 2^-8 or 2^-9: values within +-0.023
        blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 120, (E, rows, cols // 32), dtype=torch.uint8, generator=g)
        return blocks, scales

    def tensors():
        yield "model.embed_tokens.weight", rnd(V, H, scale=1.0)
        for i in range(layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (1 + rnd(H, scale=0.1))
            yield f"{p}.post_attention_layernorm.weight", (1 + rnd(H, scale=0.1))
            for n, rows, cols in (("q", HEADS * D, H), ("k", KV * D, H), ("v", KV * D, H), ("o", H, HEADS * D)):
                yield f"{p}.self_attn.{n}_proj.weight", rnd(rows, cols)
                yield f"{p}.self_attn.{n}_proj.bias", rnd(rows)
            yield f"{p}.self_attn.sinks", rnd(HEADS, scale=1.0)
            yield f"{p}.mlp.router.weight", rnd(E, H, scale=0.5)
            yield f"{p}.mlp.router.bias", rnd(E, scale=0.1)
            for part, rows, cols in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
                b, s = mx(rows, cols)
                yield f"{p}.mlp.experts.{part}_blocks", b
                yield f"{p}.mlp.experts.{part}_scales", s
                yield f"{p}.mlp.experts.{part}_bias", rnd(E, rows)
        yield "model.norm.weight", (1 + rnd(H, scale=0.1))
        yield "lm_head.weight", rnd(V, H)

    t0 = time.perf_counter()
    write_checkpoint(folder, config(layers), tensors(), max_shard_bytes=2 * 1000**3, force=True)
    print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder


def child_ours(path: str, threads: int, n_prompt: int, n_decode: int, cache_bytes: int = 0,
               compile: int = 0) -> dict:
    """emo-serve's model core on the profile: prefill, then greedy decode; RSS after them.
    `cache_bytes` > 0 keeps that many bytes of dequantized experts (modeling.quant.mxfp4.DequantCache);
    `compile` decodes through the fused MXFP4 GEMV (`emo-serve --compile`; compiled in the warm-up)."""
    import torch

    torch.set_num_threads(threads)
    bare = rss_bytes()
    from modeling import load_model

    t0 = time.perf_counter()
    m = load_model(path, mxfp4_cache_bytes=cache_bytes, compile=bool(compile))
    load_s = time.perf_counter() - t0
    ids = list(range(1000, 1000 + n_prompt))
    m.logits(ids[:16])  # warm-up: both contenders start from the page cache
    m.logits(ids[:1])  # one row: compiles the fused GEMV's two matrix shapes with --compile
    pf, dc = time_greedy(m, ids, n_decode)
    c = m.transformer.mxfp4_cache
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "load_s": load_s, "rss": rss_bytes(), "bare_rss": bare,
            "cache_bytes": cache_bytes, "cache_hits": c.hits if c else 0, "cache_misses": c.misses if c else 0}


def run_child(kind: str, *args) -> dict:
    return run_script_child(__file__, kind, *args)


def bytes_per_decoded_token(layers: int) -> int:
    attn = (2 * HEADS * D * H + 2 * KV * D * H) * 2
    experts = K * 3 * H * I * 17 // 32  # MXFP4: 4 bits a value + one byte per 32
    return layers * (attn + experts + KEEP * H * 2) + V * H * 2 + H * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench-gptoss")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, *nums = args.child
        fn = {"ours": child_ours, "hf": child_hf}[kind]
        print(json.dumps(fn(path, *map(int, nums))))
        return

    root = Path(args.dir)
    base = write_base(root / f"gpt-oss-20b-shape-{args.layers}l", args.layers)
    prof = root / f"gptoss-{args.layers}l-keep{KEEP}"
    res: dict = {"layers": args.layers, "threads": args.threads, "prompt": args.prompt, "decode": args.decode,
                 "base_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors"))}
    res["build"] = build_profile(base, prof, args.threads, KEEP)
    print(f"build: {res['build']}", file=sys.stderr)
    res["ours"] = run_child("ours", prof, args.threads, args.prompt, args.decode)
    print(f"ours: {res['ours']}", file=sys.stderr)
    expanded = args.layers * KEEP * 3 * H * I * 2  # every kept expert in bf16
    res["ours+cache"] = run_child("ours", prof, args.threads, args.prompt, args.decode, expanded)
    print(f"ours+cache: {res['ours+cache']}", file=sys.stderr)
    res["ours --compile"] = run_child("ours", prof, args.threads, args.prompt, args.decode, 0, 1)
    print(f"ours --compile: {res['ours --compile']}", file=sys.stderr)
    if not args.skip_hf:
        try:
            res["transformers"] = run_child("hf", prof, args.threads, args.prompt, args.decode)
        except RuntimeError as e:  # print what the others measured anyway
            res["transformers"] = str(e).splitlines()[0]
        print(f"transformers: {res['transformers']}", file=sys.stderr)
    res["bytes_per_decoded_token"] = bytes_per_decoded_token(args.layers)

    gb = 1e9
    b = res["build"]
    print(f"\ngpt-oss-20b shape, {args.layers} of 24 layers, random bf16 + MXFP4 experts; {args.threads} threads; "
          f"prompt {args.prompt}, decode {args.decode}")
    print(f"base {res['base_bytes'] / gb:.2f} GB -> {KEEP}-expert profile {b['profile_bytes'] / gb:.2f} GB "
          f"(MXFP4 bytes kept): built in {b['wall_s']:.1f} s, peak RSS {b['peak_rss'] / gb:.2f} GB")
    print("| engine | prefill tok/s | decode tok/s | load s | RSS after forward GB |")
    print("|---|---|---|---|---|")
    for key in ("ours", "ours+cache", "ours --compile", "transformers"):
        r = res.get(key)
        if isinstance(r, dict):
            print(f"| {key} | {r['prefill_tok_s']:.2f} | {r['decode_tok_s']:.3f} | {r['load_s']:.1f} "
                  f"| {r['rss'] / gb:.2f} |")
        elif r:
            print(f"| {key} | {r} |")
    if isinstance(res.get("transformers"), dict):
        t = res["transformers"]
        for key in ("ours", "ours+cache", "ours --compile"):
            o = res[key]
            print(f"{key} / transformers: prefill x{o['prefill_tok_s'] / t['prefill_tok_s']:.2f}, "
                  f"decode x{o['decode_tok_s'] / t['decode_tok_s']:.2f}, RSS x{o['rss'] / t['rss']:.2f}")
    print(f"bytes read per decoded token (MXFP4 experts): {res['bytes_per_decoded_token'] / gb:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
