"""Qwen3.5-35B-A3B-shaped benchmark on a few layers (issue 19): build a 25% profile, serve it.

Writes (once, into --dir) a Qwen3.5-MoE checkpoint in the published multimodal layout
(`text_config`, `model.language_model.`) with random bf16 weights and the release's layer
shapes: hidden 2048; Gated DeltaNet layers with 16 key heads / 32 value heads of 128 and a
conv of 4; gated full-attention layers with 16 query / 2 kv heads of 256, partial RoPE 0.25;
256 routed experts of 512 (top-8) plus a gated shared expert of 512. The release has 40
layers (30 DeltaNet, 10 full, 3:1); here --layers, every 4th and the last one full
(default 2: one layer of each kind, 1.6 GB of experts each; 4 gives one 3:1 period, ~6.9 GB).
The vocabulary is cut to --vocab (default 32768; the release has 248320) so that the few
layers, not a 1 GB lm_head, are what is timed.

Then, each part in a fresh process so resident memory is clean:
  a) `emo-subset build --keep 64 --method random` (25% of the routed experts): wall time,
     peak RSS of the build, profile size
  b) single-sequence prefill and decode tokens/s of the profile, bf16: emo-serve's model
     core (before and after transformers, as the cores are shared) and transformers
     (AutoModelForCausalLM on the same folder: the profile is a stock checkpoint), with RSS
  c) arithmetic: one sequence's state at 4k tokens in the released 40-layer model, per layer
     kind, from the attention modules' own `state_bytes`: the recurrent + conv state of the
     30 DeltaNet layers, the KV cache of the 10 full layers, and what a KV cache in all 40
     layers would take

Usage: flock /tmp/emo-bench.lock python benchmarks/bench_qwen35.py --dir /tmp/emo-bench-qwen35 [--layers 4]
--clean removes the checkpoints afterwards. Prints a table; --json FILE also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import run_script_child  # noqa: E402
from bench_qwen3 import build_profile, child_hf, child_ours  # noqa: E402

H, HEADS, KV, D, E, I, K = 2048, 16, 2, 256, 256, 512, 8
LK, LV, LD, CONV = 16, 32, 128, 4  # linear attention: key heads, value heads, head dim, conv kernel
KEEP = 64  # 25% of 256
RELEASE_LAYERS = 40


def text_config(layers: int, vocab: int) -> dict:
    return {"model_type": "qwen3_5_moe_text", "hidden_size": H, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": D,
            "layer_types": ["full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "linear_attention"
                            for i in range(layers)],
            "linear_num_key_heads": LK, "linear_num_value_heads": LV, "linear_key_head_dim": LD,
            "linear_value_head_dim": LD, "linear_conv_kernel_dim": CONV, "num_experts": E, "num_experts_per_tok": K,
            "moe_intermediate_size": I, "shared_expert_intermediate_size": I, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True},
            "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "tie_word_embeddings": False,
            "attention_bias": False, "hidden_act": "silu", "eos_token_id": 2, "dtype": "bfloat16"}


def config(layers: int, vocab: int) -> dict:
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text_config(layers, vocab), "tie_word_embeddings": False, "dtype": "bfloat16"}


def write_base(folder: Path, layers: int, vocab: int) -> Path:
    """Random bf16 weights, generated and written one tensor at a time (never the whole model in RAM)."""
    import torch

    from modeling.io.safetensors_io import write_checkpoint
    from tests.checkpoints import write_tokenizer

    cfg = config(layers, vocab)
    if (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == cfg:
        return folder
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)

    def tensors():
        m = "model.language_model"
        yield f"{m}.embed_tokens.weight", rnd(vocab, H, scale=1.0)
        for i, kind in enumerate(cfg["text_config"]["layer_types"]):
            p = f"{m}.layers.{i}"
            yield f"{p}.input_layernorm.weight", rnd(H, scale=0.1)  # zero-centred: the model scales by 1 + w
            yield f"{p}.post_attention_layernorm.weight", rnd(H, scale=0.1)
            if kind == "linear_attention":
                la, conv_dim = f"{p}.linear_attn", 2 * LK * LD + LV * LD
                yield f"{la}.in_proj_qkv.weight", rnd(conv_dim, H)
                yield f"{la}.in_proj_z.weight", rnd(LV * LD, H)
                yield f"{la}.in_proj_b.weight", rnd(LV, H)
                yield f"{la}.in_proj_a.weight", rnd(LV, H)
                yield f"{la}.conv1d.weight", rnd(conv_dim, 1, CONV, scale=0.3)
                yield f"{la}.dt_bias", rnd(LV, scale=1.0)
                yield f"{la}.A_log", torch.log(torch.rand(LV, generator=g) * 15 + 1).to(torch.bfloat16)
                yield f"{la}.norm.weight", 1 + rnd(LD, scale=0.1)
                yield f"{la}.out_proj.weight", rnd(H, LV * LD)
            else:
                a = f"{p}.self_attn"
                yield f"{a}.q_proj.weight", rnd(2 * HEADS * D, H)
                yield f"{a}.k_proj.weight", rnd(KV * D, H)
                yield f"{a}.v_proj.weight", rnd(KV * D, H)
                yield f"{a}.o_proj.weight", rnd(H, HEADS * D)
                yield f"{a}.q_norm.weight", rnd(D, scale=0.1)
                yield f"{a}.k_norm.weight", rnd(D, scale=0.1)
            yield f"{p}.mlp.gate.weight", rnd(E, H, scale=0.5)
            for j in range(E):
                yield f"{p}.mlp.experts.{j}.gate_proj.weight", rnd(I, H)
                yield f"{p}.mlp.experts.{j}.up_proj.weight", rnd(I, H)
                yield f"{p}.mlp.experts.{j}.down_proj.weight", rnd(H, I)
            for part, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
                yield f"{p}.mlp.shared_expert.{part}_proj.weight", rnd(*shape)
            yield f"{p}.mlp.shared_expert_gate.weight", rnd(1, H)
        yield f"{m}.norm.weight", rnd(H, scale=0.1)
        yield "lm_head.weight", rnd(vocab, H)

    t0 = time.perf_counter()
    write_checkpoint(folder, cfg, tensors(), max_shard_bytes=2 * 1000**3, force=True)
    write_tokenizer(folder, 1000)
    print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return folder


def child_write(folder: str, layers: int, vocab: int) -> dict:
    write_base(Path(folder), layers, vocab)
    return {}


def state_at(tokens: int, itemsize: int = 2) -> dict:
    """One sequence's cache state in the released 40-layer model at `tokens` positions, by layer kind
    (the attention modules' own state_bytes), and a KV cache in every layer for comparison."""
    from modeling.layers.attention import GroupedQueryAttention, attention_modules
    from modeling.config import ModelConfig

    cfg = ModelConfig.from_dict(config(RELEASE_LAYERS, 248320))
    out: dict = {}
    for m in attention_modules(cfg):
        kind = cfg.layer_types[m.layer]
        out[kind] = out.get(kind, 0) + m.state_bytes(1, tokens, itemsize)
    kv_layer = GroupedQueryAttention(cfg, 0).state_bytes(1, tokens, itemsize)
    out["kv cache in all 40 layers"] = RELEASE_LAYERS * kv_layer
    out["per-token kv of a full layer"] = kv_layer // tokens
    return out


def run_child(kind: str, *args) -> dict:
    return run_script_child(__file__, kind, *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench-qwen35", help="where the checkpoints go (~3.5 + 1.1 GB for 2 layers)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--clean", action="store_true", help="remove the checkpoints at the end")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"ours": child_ours, "hf": child_hf, "write": child_write}[kind]
        conv = {"write": [str, int, int]}.get(kind, [str] + [int] * 4)
        print(json.dumps(fn(*[c(x) for c, x in zip(conv, rest)])))
        return

    root = Path(args.dir)
    base = root / f"qwen35-35b-a3b-shape-{args.layers}l"
    prof = root / f"qwen35-{args.layers}l-keep{KEEP}"
    res: dict = {"layers": args.layers, "vocab": args.vocab, "threads": args.threads, "prompt": args.prompt,
                 "decode": args.decode}
    try:  # --clean removes what was written even when a part fails (a full disk, ...)
        run_child("write", base, args.layers, args.vocab)
        res["base_bytes"] = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        res["build"] = build_profile(base, prof, args.threads, KEEP)
        print(f"build: {res['build']}", file=sys.stderr)
        res["ours"] = run_child("ours", prof, args.threads, args.prompt, args.decode)
        print(f"ours: {res['ours']}", file=sys.stderr)
        if not args.skip_hf:
            res["transformers"] = run_child("hf", prof, args.threads, args.prompt, args.decode)
            print(f"transformers: {res['transformers']}", file=sys.stderr)
        res["ours (again)"] = run_child("ours", prof, args.threads, args.prompt, args.decode)
    finally:
        if args.clean:
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(prof, ignore_errors=True)
    res["state_4k"] = state_at(4096)

    gb, mib = 1e9, 2**20
    b = res["build"]
    kinds = text_config(args.layers, args.vocab)["layer_types"]
    print(f"\nQwen3.5-35B-A3B shape, {args.layers} layers ({kinds.count('linear_attention')} Gated DeltaNet, "
          f"{kinds.count('full_attention')} gated full attention), vocab "
          f"{args.vocab}, random bf16; {args.threads} threads; prompt {args.prompt}, decode {args.decode}")
    print(f"base {res['base_bytes'] / gb:.2f} GB -> {KEEP}-of-{E} profile {b['profile_bytes'] / gb:.2f} GB: "
          f"built in {b['wall_s']:.1f} s, peak RSS {b['peak_rss'] / gb:.2f} GB")
    print("| engine | prefill tok/s | decode tok/s | load s | RSS GB |")
    print("|---|---|---|---|---|")
    for key in ("ours", "ours (again)", "transformers"):
        r = res.get(key)
        if isinstance(r, dict):
            print(f"| {key} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r['load_s']:.1f} "
                  f"| {r['rss'] / gb:.2f} |")
    if isinstance(res.get("transformers"), dict):
        o, t = res["ours"], res["transformers"]
        print(f"ours / transformers: prefill x{o['prefill_tok_s'] / t['prefill_tok_s']:.2f}, "
              f"decode x{o['decode_tok_s'] / t['decode_tok_s']:.2f}")
    s = res["state_4k"]
    print(f"one sequence at 4096 tokens, released 40 layers, bf16 cache: 30 DeltaNet layers' state "
          f"{s['linear_attention'] / mib:.1f} MiB (fixed, whatever the length) + 10 full layers' KV "
          f"{s['gated_attention'] / mib:.1f} MiB = {(s['linear_attention'] + s['gated_attention']) / mib:.1f} MiB; "
          f"a KV cache in all 40 layers: {s['kv cache in all 40 layers'] / mib:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
