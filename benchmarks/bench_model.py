"""Model-core benchmark (issue 2): memory and speed on an EMO-shaped checkpoint.

Writes (once, into --dir) a 4-layer EMO-shaped checkpoint with random bf16
weights (hidden 2048, 16 heads, 128 experts of intermediate 1024 with 1
shared, top-8, vocab 100352) and its OLMoE twin (same tensors, OLMoE names,
q/k norms, no shared expert), then measures in one run, each part in a fresh
subprocess so resident memory is clean:

  a) RSS after `load_model`, above the bare interpreter with torch imported
  b) RSS after a forward restricted to a 32-expert pool, against the bytes of
     base weights + pool experts
  c) single-sequence prefill and decode tokens/s (bf16, --threads threads) for
     emo-serve on both checkpoints and for transformers' OLMoE on the OLMoE
     one, next to the memory-bandwidth floor (bytes read per decoded token /
     copy bandwidth measured here, read + written bytes
     per second as STREAM counts them)
  d) optionally (--llama-bench PATH --gguf PATH, both given): llama.cpp's
     llama-bench on the OLMoE checkpoint converted to a bf16 GGUF, with the same
     thread count, prompt and decode lengths (build and conversion:
     benchmarks/llama_cpp.md, benchmarks/build_llama_cpp.sh); --gguf-q8 /
     --gguf-q4 add its Q8_0 / Q4_0 (llama-quantize of that GGUF)
  e) optionally, issue 10: the OLMoE checkpoint written by `emo-subset quantize`
     as int8 / int4 (--int8-ckpt / --int4-ckpt), next to llama.cpp at the same
     precision; --busy: bf16 again while a second torch process (a bounded
     matmul loop, default threads) shares the cores; --int4-profile: resident
     memory of an int4 32-expert profile of the EMO checkpoint

Usage: python benchmarks/bench_model.py --dir /tmp/emo-bench [--threads 2]
           [--llama-bench .bench/llama.cpp/build/bin/llama-bench --gguf .bench/olmoe-4l-bf16.gguf]
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

SHAPE = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128, intermediate_size=1024,
             num_experts=128, num_experts_per_tok=8, vocab_size=100352, num_hidden_layers=4,
             max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
             eos_token_id=100257, pad_token_id=100277)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- checkpoint writing ----------------------------------------------------------

def random_tensors(shape: dict, olmoe_names: bool, seed: int = 0):
    """Random bf16 tensors of an EMO (or, with `olmoe_names`, OLMoE: q/k norms, no shared
    expert) checkpoint of `shape` (config keys), streamed one at a time; the same seed
    gives both twins the same numbers."""
    import torch

    H, I, E = shape["hidden_size"], shape["intermediate_size"], shape["num_experts"]
    V, L = shape["vocab_size"], shape["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*dims, scale=0.02):
        return (torch.randn(*dims, generator=g) * scale).to(torch.bfloat16)

    an, mn = ("input_layernorm", "post_attention_layernorm") if olmoe_names else ("pre_attention_layernorm", "pre_feedforward_layernorm")
    yield "model.embed_tokens.weight", rnd(V, H, scale=1.0)
    for i in range(L):
        p = f"model.layers.{i}"
        yield f"{p}.{an}.weight", torch.ones(H, dtype=torch.bfloat16)
        for n in "qkvo":
            yield f"{p}.self_attn.{n}_proj.weight", rnd(H, H)
        if olmoe_names:
            yield f"{p}.self_attn.q_norm.weight", torch.ones(H, dtype=torch.bfloat16)
            yield f"{p}.self_attn.k_norm.weight", torch.ones(H, dtype=torch.bfloat16)
        yield f"{p}.{mn}.weight", torch.ones(H, dtype=torch.bfloat16)
        yield f"{p}.mlp.gate.weight", rnd(E, H, scale=0.5)
        for j in range(E):
            yield f"{p}.mlp.experts.{j}.gate_proj.weight", rnd(I, H)
            yield f"{p}.mlp.experts.{j}.up_proj.weight", rnd(I, H)
            yield f"{p}.mlp.experts.{j}.down_proj.weight", rnd(H, I)
    yield "model.norm.weight", torch.ones(H, dtype=torch.bfloat16)
    yield "lm_head.weight", rnd(V, H)


def write_checkpoints(root: Path) -> tuple[Path, Path]:
    from modeling.io.safetensors_io import write_checkpoint

    emo, olmoe = root / "emo-4l", root / "olmoe-4l"
    cfg_emo = {"model_type": "emo", "architectures": ["EmoForCausalLM"], "num_shared_experts": 1,
               "norm_topk_prob": False, "torch_dtype": "bfloat16", **SHAPE}
    cfg_olmoe = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "norm_topk_prob": False,
                 "clip_qkv": None, "torch_dtype": "bfloat16", "attention_bias": False, **SHAPE}
    for folder, cfg, ol in ((emo, cfg_emo, False), (olmoe, cfg_olmoe, True)):
        if (folder / "config.json").is_file():
            continue
        t0 = time.time()
        write_checkpoint(folder, cfg, random_tensors(SHAPE, ol), max_shard_bytes=2 * 1024**3)
        print(f"wrote {folder} in {time.time() - t0:.0f} s", file=sys.stderr)
    return emo, olmoe


# -- measurements, each run in a fresh interpreter ---------------------------------

def child_memory(path: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    bare = rss_bytes()
    from modeling import load_model

    t0 = time.perf_counter()
    m = load_model(path)
    load_s = time.perf_counter() - t0
    after_load = rss_bytes()
    pool = {i: list(range(96, 128)) for i in range(m.config.num_layers)}  # 31 routed + the shared one
    ids = list(range(1000, 1000 + 256))
    m.logits(ids, pool=pool)
    after_fwd = rss_bytes()
    pool_bytes = sum(m.expert_bytes(i, e) for i, ids_ in pool.items() for e in ids_)
    ideal = m.non_expert_bytes() + pool_bytes
    return {"bare_rss": bare, "load_s": load_s, "rss_after_load": after_load, "rss_after_pool_forward": after_fwd,
            "base_plus_pool_bytes": ideal, "file_bytes": m.files.total_bytes()}


def _time_decode(step, prefill, n_prompt: int, n_decode: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    prefill()
    t1 = time.perf_counter()
    for _ in range(n_decode):
        step()
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), n_decode / (t2 - t1)


def neighbour_loop(threads: int, seconds: float) -> None:
    """A second torch process sharing the cores: a bounded matmul loop (default threads
    unless given), as another tenant of the machine would run."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    t0 = time.time()
    while time.time() - t0 < seconds:
        a = torch.tanh(a @ a) + 0.1


def child_speed_ours(path: str, threads: int, n_prompt: int, n_decode: int, variant: str = "eager") -> dict:
    import torch

    torch.set_num_threads(threads)
    from modeling import Batch, load_model

    neighbour = None
    if variant == "busy":  # a bounded matmul loop in another process shares the cores while we are timed
        plain = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        neighbour = subprocess.Popen([sys.executable, __file__, "--child", "neighbour", "0", "600"],
                                     env={**plain, "PYTHONPATH": str(ROOT)})  # torch's defaults
        time.sleep(3)

    m = load_model(path, quantize="int8" if variant == "int8" else None, compile=variant == "compile")
    if variant == "compile":  # compile every decode shape before timing (cached by Inductor afterwards)
        cache = m.new_cache(1, 8)
        for pos, t in enumerate([1000, 1001]):
            m.forward(Batch(torch.tensor([t]), [0], [pos], [1]), cache)
    ids = list(range(1000, 1000 + n_prompt))
    # warm-up: touch every page once so both contenders start from the page cache
    m.logits(ids[:64])
    cache = m.new_cache(1, n_prompt + n_decode + 8)
    state = {"tok": 5}

    def prefill():
        out = m.forward(Batch(torch.tensor(ids), [0], [0], [len(ids)]), cache)
        state["tok"] = int(out.logits[0].argmax())

    def step():
        out = m.forward(Batch(torch.tensor([state["tok"]]), [0], [cache.lengths[0]], [1]), cache)
        state["tok"] = int(out.logits[0].argmax())

    pf, dc = _time_decode(step, prefill, n_prompt, n_decode)
    if neighbour is not None:
        neighbour.kill()
        neighbour.wait()
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "rss": rss_bytes()}


def child_profile_memory(path: str, threads: int) -> dict:
    """RSS of a profile after a forward over 256 tokens (every kept expert used), against
    its shard bytes: base + experts at their stored (quantized) size."""
    import torch

    torch.set_num_threads(threads)
    bare = rss_bytes()
    from modeling import load_model

    m = load_model(path)
    m.logits(list(range(1000, 1000 + 256)))
    used = m.files.total_bytes()
    return {"bare_rss": bare, "rss_after_forward": rss_bytes(), "file_bytes": used}


def child_speed_hf(path: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers

    t0 = time.perf_counter()
    m = transformers.OlmoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
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
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "load_s": load_s, "rss": rss_bytes()}


def child_bandwidth(threads: int) -> dict:
    """Copy bandwidth in the STREAM convention (bytes read + bytes written per
    second), and a read-only pass for reference, best of 5, on 512 MiB."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(512 * 1024**2, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    best_copy = best_read = float("inf")
    wide = a.view(torch.int64)
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        wide.sum()
        best_read = min(best_read, time.perf_counter() - t0)
    return {"copy_GBps": 2 * a.numel() / best_copy / 1e9, "read_GBps": a.numel() / best_read / 1e9}


def run_script_child(script: str, kind: str, *args, env: dict | None = None) -> dict:
    """`python SCRIPT --child KIND ARGS...` in a fresh process (clean resident memory); its
    last line of output is the JSON result. Shared by the benchmark scripts."""
    cmd = [sys.executable, script, "--child", kind, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if out.returncode != 0:  # -9: killed, most likely by the kernel's OOM killer
        raise RuntimeError(f"{kind} failed with exit status {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(kind: str, *args) -> dict:
    env = {}
    if kind == "ours" and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ):
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # what emo-serve sets (server.cli.openmp_wait_default)
    return run_script_child(__file__, kind, *args, env=env)


def run_llama_bench(binary: str, gguf: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    """llama.cpp's llama-bench on `gguf`: prefill (pp) and decode (tg) tokens/s, peak RSS, load time.

    llama-bench times the prompt and the generation as separate tests (tg starts from an empty
    context) and repeats each 5 times after a warm-up; avg_ts is their mean. The load time is the
    wall time between its "--progress" lines "starting" and "warmup prompt run" (model load from
    the mmap'd file + context creation). The peak RSS comes from wait4, like /usr/bin/time -v.
    """
    import threading

    cmd = [binary, "-m", gguf, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_decode), "-o", "json", "--progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stamps: dict[str, float] = {}
    err: list[str] = []

    def read_err() -> None:
        for line in p.stderr:
            err.append(line)
            for key in ("starting", "warmup prompt run"):
                if line.rstrip().endswith(f": {key}") and key not in stamps:
                    stamps[key] = time.perf_counter()

    t = threading.Thread(target=read_err, daemon=True)
    t.start()
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    t.join()
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({p.returncode}):\n{''.join(err)[-3000:]}")
    tests = json.loads(out)
    pp = next(r for r in tests if r["n_prompt"] == n_prompt and r["n_gen"] == 0)
    tg = next(r for r in tests if r["n_gen"] == n_decode and r["n_prompt"] == 0)
    res = {"prefill_tok_s": pp["avg_ts"], "prefill_tok_s_stddev": pp["stddev_ts"],
           "decode_tok_s": tg["avg_ts"], "decode_tok_s_stddev": tg["stddev_ts"],
           "rss": usage.ru_maxrss * 1024, "file_bytes": os.path.getsize(gguf), "threads": tg["n_threads"],
           "model_type": tg.get("model_type"), "build_commit": tg.get("build_commit"), "cpu_info": tg.get("cpu_info")}
    if "starting" in stamps and "warmup prompt run" in stamps:
        res["load_s"] = stamps["warmup prompt run"] - stamps["starting"]
    return res


def bytes_per_decoded_token() -> int:
    H, I, V, L, k = 2048, 1024, 100352, 4, 8
    attn = 4 * H * H * 2
    experts = k * 3 * H * I * 2
    router = 128 * H * 2
    return L * (attn + experts + router) + V * H * 2 + H * 2  # + lm_head + one embedding row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench", help="where the checkpoints are written (~15 GB)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers (needs ~2x the file in RAM)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (see benchmarks/llama_cpp.md); needs --gguf")
    ap.add_argument("--gguf", help="the OLMoE checkpoint converted to a bf16 GGUF (benchmarks/build_llama_cpp.sh)")
    ap.add_argument("--gguf-q8", help="the same checkpoint as a Q8_0 GGUF (llama-quantize)")
    ap.add_argument("--gguf-q4", help="the same checkpoint as a Q4_0 GGUF (llama-quantize)")
    ap.add_argument("--int8-ckpt", help="the OLMoE checkpoint written by `emo-subset quantize --quantize int8`")
    ap.add_argument("--int4-ckpt", help="the OLMoE checkpoint written by `emo-subset quantize --quantize int4`")
    ap.add_argument("--int4-profile", help="an int4 32-expert profile of the EMO checkpoint (resident memory row)")
    ap.add_argument("--busy", action="store_true", help="also time bf16 with a second torch process sharing the cores")
    ap.add_argument("--only-quant", action="store_true", help="skip the issue-2 rows (compile, lazy int8, EMO twin)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if bool(a.llama_bench) != bool(a.gguf):
        ap.error("--llama-bench and --gguf go together")
    if a.child:
        kind, *rest = a.child
        fn = {"memory": child_memory, "ours": child_speed_ours, "hf": child_speed_hf, "bw": child_bandwidth,
              "neighbour": neighbour_loop, "profile_memory": child_profile_memory}[kind]
        conv = [int(x) if x.isdigit() else x for x in rest]
        print(json.dumps(fn(*conv)))
        return

    emo, olmoe = write_checkpoints(Path(a.dir))
    res: dict = {"threads": a.threads}
    res["bandwidth"] = run_child("bw", a.threads)
    res["memory"] = run_child("memory", emo, a.threads)
    if not a.only_quant:
        res["ours_emo"] = run_child("ours", emo, a.threads, a.prompt, a.decode)
    res["ours_olmoe"] = run_child("ours", olmoe, a.threads, a.prompt, a.decode)
    if not a.only_quant:
        res["ours_emo_compile"] = run_child("ours", emo, a.threads, a.prompt, a.decode, "compile")
        res["ours_emo_int8"] = run_child("ours", emo, a.threads, a.prompt, a.decode, "int8")
    for key, path in (("ours_olmoe_ct_int8", a.int8_ckpt), ("ours_olmoe_ct_int4", a.int4_ckpt)):
        if path:
            res[key] = run_child("ours", path, a.threads, a.prompt, a.decode)
    if a.only_quant:  # bf16 --compile on the same checkpoint (the issue-2 rows time it on the EMO one)
        res["ours_olmoe_compile"] = run_child("ours", olmoe, a.threads, a.prompt, a.decode, "compile")
    if a.busy:
        res["ours_olmoe_busy"] = run_child("ours", olmoe, a.threads, a.prompt, a.decode, "busy")
    if a.int4_profile:
        res["int4_profile_memory"] = run_child("profile_memory", a.int4_profile, a.threads)
    if not a.skip_hf:
        res["hf_olmoe"] = run_child("hf", olmoe, a.threads, a.prompt, a.decode)
    if a.llama_bench:
        res["llama_cpp_olmoe"] = run_llama_bench(a.llama_bench, a.gguf, a.threads, a.prompt, a.decode)
        for key, g in (("llama_cpp_olmoe_q8_0", a.gguf_q8), ("llama_cpp_olmoe_q4_0", a.gguf_q4)):
            if g:
                res[key] = run_llama_bench(a.llama_bench, g, a.threads, a.prompt, a.decode)
    bpt = bytes_per_decoded_token()
    floor = res["bandwidth"]["copy_GBps"] * 1e9 / bpt
    res["floor_decode_tok_s"] = floor
    res["bytes_per_decoded_token"] = bpt

    GiB, MiB = 1024**3, 1024**2
    m = res["memory"]
    print(f"\n== emo-serve model core, EMO-shaped 4-layer bf16 checkpoint ({m['file_bytes'] / GiB:.2f} GiB), {a.threads} threads ==")
    bw = res["bandwidth"]
    print(f"copy bandwidth                 {bw['copy_GBps']:.1f} GB/s (read + write, STREAM convention; "
          f"read-only pass {bw['read_GBps']:.1f} GB/s)")
    print(f"(a) load_model                 {m['load_s'] * 1000:.0f} ms, RSS +{(m['rss_after_load'] - m['bare_rss']) / MiB:.0f} MiB "
          f"above bare torch ({m['bare_rss'] / MiB:.0f} MiB)   target < 100 MiB")
    ratio = m["rss_after_pool_forward"] / m["base_plus_pool_bytes"]
    print(f"(b) after 32-expert pool fwd   RSS {m['rss_after_pool_forward'] / GiB:.2f} GiB vs base+pool "
          f"{m['base_plus_pool_bytes'] / GiB:.2f} GiB = {ratio:.2f}x   target <= 1.15x")
    print(f"(c) decode floor               {floor:.1f} tok/s ({bpt / MiB:.0f} MiB read per token)")
    names = [("ours_emo", "emo-serve, EMO ckpt"), ("ours_olmoe", "emo-serve bf16 (exact), OLMoE ckpt"),
             ("ours_emo_compile", "emo-serve --compile, EMO ckpt"), ("ours_emo_int8", "emo-serve lazy int8, EMO ckpt"),
             ("ours_olmoe_ct_int8", "emo-serve int8 (compressed-tensors), OLMoE"),
             ("ours_olmoe_ct_int4", "emo-serve int4 (compressed-tensors), OLMoE"),
             ("ours_olmoe_compile", "emo-serve bf16 --compile, OLMoE"),
             ("ours_olmoe_busy", "emo-serve bf16, OLMoE, busy neighbour"),
             ("hf_olmoe", "transformers, OLMoE ckpt"), ("llama_cpp_olmoe", "llama.cpp, OLMoE ckpt (gguf bf16)"),
             ("llama_cpp_olmoe_q8_0", "llama.cpp, OLMoE ckpt (gguf Q8_0)"),
             ("llama_cpp_olmoe_q4_0", "llama.cpp, OLMoE ckpt (gguf Q4_0)")]
    rows = [(label, res[key]) for key, label in names if key in res]
    w = max(26, *(len(n) for n, _ in rows))
    for name, r in rows:
        extra = f"  (load {r['load_s']:.1f} s, RSS {r['rss'] / GiB:.1f} GiB)" if "load_s" in r else \
            (f"  (RSS {r['rss'] / GiB:.2f} GiB)" if "rss" in r else "")
        if "file_bytes" in r:  # llama.cpp: RSS against the GGUF it maps
            extra = (f"  (load {r['load_s']:.2f} s, " if "load_s" in r else "  (") + \
                f"RSS {r['rss'] / GiB:.2f} GiB, file {r['file_bytes'] / GiB:.2f} GiB)"
        print(f"    {name:{w}s} prefill {r['prefill_tok_s']:7.1f} tok/s   decode {r['decode_tok_s']:6.2f} tok/s "
              f"= {r['decode_tok_s'] / floor:.0%} of floor{extra}")
    if "hf_olmoe" in res:
        hf = res["hf_olmoe"]
        print(f"    speed-up vs transformers (OLMoE ckpt): decode {res['ours_olmoe']['decode_tok_s'] / hf['decode_tok_s']:.2f}x, "
              f"prefill {res['ours_olmoe']['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x   target >= 2.5x, within 2x of floor")
    pairs = [("bf16", "ours_olmoe", "llama_cpp_olmoe"), ("int8 / Q8_0", "ours_olmoe_ct_int8", "llama_cpp_olmoe_q8_0"),
             ("int4 / Q4_0", "ours_olmoe_ct_int4", "llama_cpp_olmoe_q4_0"),
             ("bf16 compile", "ours_olmoe_compile", "llama_cpp_olmoe")]
    for label, ours_key, ll_key in pairs:
        if ours_key in res and ll_key in res:
            o, ll = res[ours_key], res[ll_key]
            print(f"    vs llama.cpp at {label:12s} decode {o['decode_tok_s'] / ll['decode_tok_s']:.2f}x, "
                  f"prefill {o['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x   target >= 1.0x")
    if "ours_olmoe_busy" in res:
        q, b = res["ours_olmoe"], res["ours_olmoe_busy"]
        print(f"    busy neighbour slowdown: decode {q['decode_tok_s'] / b['decode_tok_s']:.2f}x, "
              f"prefill {q['prefill_tok_s'] / b['prefill_tok_s']:.2f}x   target <= ~2x on 2 cores")
    if "int4_profile_memory" in res:
        pm = res["int4_profile_memory"]
        print(f"(e) int4 32-expert profile of the EMO ckpt: RSS {pm['rss_after_forward'] / GiB:.2f} GiB after a "
              f"256-token forward (bare torch {pm['bare_rss'] / GiB:.2f} GiB), shard files {pm['file_bytes'] / GiB:.2f} GiB "
              f"= {(pm['rss_after_forward'] - pm['bare_rss']) / pm['file_bytes']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
