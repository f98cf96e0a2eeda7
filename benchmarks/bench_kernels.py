"""Native kernels against llama.cpp (issue 22): a Qwen3-30B-A3B-shaped 32-expert profile in bf16, int8 and int4,
against llama.cpp on its own `emo-subset export-gguf` (bf16, and llama-quantize's Q8_0 / Q4_0 of it).

In one run, each part in a fresh process, on whatever CPU this is (its flags are printed):
  a) the base (bench_qwen3's writer: random bf16 weights, --layers layers) and three 32-expert profiles of it:
     `emo-subset build --keep 32 --method random` plain, `--quantize int8` and `--quantize int4`
  b) single-sequence prefill (--prompt tokens) and decode (--decode tokens) of each profile through emo-serve's
     model core with emo-serve's defaults (OMP_WAIT_POLICY=PASSIVE, native kernels on the best ISA), then
  c) right after it, llama-bench (--llama-bench; `benchmarks/build_llama_cpp.sh` builds one) on the bf16 GGUF
     and its Q8_0 / Q4_0 (--llama-quantize), the two alternating --rounds times (medians), then ours with spinning OpenMP threads (--omp-active), the
     int8 / int4 matrices read as stored (--stored-layout: no interleaved copy), forced to each other ISA the
     CPU runs (--other-isas, EMO_CPU_ISA) and on the pure-torch path (torch)
  d) the memory floor: bytes read per decoded token (counted from the loaded profile) / measured read bandwidth
  e) int4 decode next to a busy torch neighbour (a 2-thread matmul loop), against alone

Usage: flock /tmp/emo-bench.lock python benchmarks/bench_kernels.py --dir /tmp/emo-bench-kernels [--layers 8]
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

from bench_model import child_bandwidth, neighbour_loop, rss_bytes, run_llama_bench, run_script_child  # noqa: E402
from bench_qwen3 import KEEP, export, time_greedy, write_base  # noqa: E402

LLAMA = "/work/llama-build/llama.cpp/build/bin"


def cpu_flags() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            keep = ("avx", "fma", "f16c", "amx", "vnni", "bf16")
            return " ".join(sorted(f for f in line.split(":", 1)[1].split() if f.startswith(keep) or f in keep))
    return "?"


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


# -- children -------------------------------------------------------------------------------------------------

def bytes_read_per_token(m) -> int:
    """Weight bytes one decoded token reads: every non-expert matrix (one embedding row), the router, and
    top-k experts of each MoE layer (their average size)."""
    from modeling.io.weights import weight_bytes

    cfg = m.config
    total = m.weights.embed.shape[1] * m.weights.embed.element_size() + weight_bytes(m.weights.lm_head)
    for lw in m.weights.layers:
        total += sum(weight_bytes(t) for t in (lw.q, lw.k, lw.v, lw.o))
        le = lw.experts
        if le is not None:
            total += le.router.numel() * le.router.element_size()
            sizes = [e.nbytes() for e in le.experts]
            total += cfg.routing.top_k * sum(sizes) // len(sizes)
    return total


def median_row(runs: list[dict]) -> dict:
    """The first run's record with the median prefill and decode speeds of all runs (and their count)."""
    def med(key: str) -> float:
        v = sorted(r[key] for r in runs)
        return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return {**runs[0], "prefill_tok_s": med("prefill_tok_s"), "decode_tok_s": med("decode_tok_s"), "runs": len(runs),
            "decode_runs": [round(r["decode_tok_s"], 2) for r in runs]}


def warm_page_cache(path: Path) -> None:
    """Read a file (or a folder's files) once, so both contenders decode from the page cache: a decoded
    token's embedding row would otherwise be a major fault (milliseconds) on a machine whose page cache
    dropped the file."""
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def child_ours(path: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    import torch

    warm_page_cache(Path(path))
    torch.set_num_threads(threads)
    from modeling import kernels, load_model

    m = load_model(path)
    ids = list(range(1000, 1000 + n_prompt))
    m.logits(ids[:64])  # warm-up: pages in the experts the prompt uses, as llama-bench's warm-up run does
    pf, dc = time_greedy(m, ids, n_decode)
    return {"prefill_tok_s": pf, "decode_tok_s": dc, "rss": rss_bytes(), "kernels": kernels.describe(),
            "bytes_per_token": bytes_read_per_token(m)}


def child_split(path: str, threads: int, n_prompt: int, n_decode: int) -> dict:
    """Where a decoded token's time goes: wall time inside the native calls (products by kind, the fused
    MoE, attention, norms) and the rest (torch ops and Python), ms per token, with emo-serve's defaults."""
    import torch

    warm_page_cache(Path(path))
    torch.set_num_threads(threads)
    from modeling import Batch, load_model

    m = load_model(path)
    k = m.transformer.kernels
    spent = {"lm_head": 0.0, "linear": 0.0, "moe": 0.0, "attention": 0.0, "rms_norm": 0.0, "rope": 0.0}
    lm_rows = m.config.vocab_size

    class Timed:  # the extension with a clock around the calls a forward pass makes
        def __init__(self, ext):
            self._ext = ext

        def __getattr__(self, name):
            return getattr(self._ext, name)

        def _timed(self, key, fn, *a):
            t0 = time.perf_counter()
            out = fn(*a)
            spent[key] += time.perf_counter() - t0
            return out

        def linear(self, x, mat, bias=None, float_out=False):
            return self._timed("lm_head" if mat.rows == lm_rows else "linear", self._ext.linear, x, mat, bias, float_out)

        def moe(self, *a):
            return self._timed("moe", self._ext.moe, *a)

        def attend_decode(self, *a):
            return self._timed("attention", self._ext.attend_decode, *a)

        def rms_norm(self, *a):
            return self._timed("rms_norm", self._ext.rms_norm, *a)

        def linear_many(self, x, mats, biases):
            key = "lm_head" if any(m.rows == lm_rows for m in mats) else "linear"
            return self._timed(key, self._ext.linear_many, x, mats, biases)

        def rope(self, *a):
            return self._timed("rope", self._ext.rope, *a)

    k.ext = Timed(k.ext)
    k._linear, k._dense, k._moe = type(k._linear)(), type(k._dense)(), {}  # kernel objects made anew, timed
    ids = list(range(1000, 1000 + n_prompt))
    cache = m.new_cache(1, n_prompt + n_decode + 8)
    tok = int(m.forward(Batch(torch.tensor(ids), [0], [0], [n_prompt]), cache).logits[0].argmax())
    for key in spent:
        spent[key] = 0.0
    t0 = time.perf_counter()
    for _ in range(n_decode):
        out = m.forward(Batch(torch.tensor([tok]), [0], [cache.lengths[0]], [1]), cache)
        tok = int(out.logits[0].argmax())
    total = (time.perf_counter() - t0) / n_decode * 1e3
    ms = {key: v / n_decode * 1e3 for key, v in spent.items()}
    ms["rest (torch ops, Python)"] = total - sum(ms.values())
    return {"ms_per_token": total, "split_ms": ms}


def child_neighbour(threads: int, seconds: int) -> dict:
    neighbour_loop(threads, seconds)
    return {}


def run_child(kind: str, *args, env: dict | None = None) -> dict:
    base = {} if {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ) else {"OMP_WAIT_POLICY": "PASSIVE"}
    return run_script_child(__file__, kind, *args, env={**base, **(env or {})})


# -- parts ----------------------------------------------------------------------------------------------------

def build(base: Path, out: Path, threads: int, quantize: str | None, lm_head: bool) -> dict:
    if (out / "profile.json").is_file():
        return {"reused": True}
    cmd = [sys.executable, "-m", "subsetting.cli", "build", str(base), "--out", str(out), "--keep", str(KEEP),
           "--method", "random", "--threads", str(threads), "--force", "--json", "-q"]
    if quantize:
        cmd += ["--quantize", quantize] + (["--quantize-lm-head"] if lm_head else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise RuntimeError(f"emo-subset build failed:\n{p.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - t0}


def llama_quantize(binary: str, src: Path, dst: Path, kind: str, output_type: str | None = None) -> None:
    if dst.is_file():
        return
    extra = ["--output-tensor-type", output_type] if output_type else []
    p = subprocess.run([binary, *extra, str(src), str(dst), kind], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-quantize {kind} failed:\n{p.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/emo-bench-kernels")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--llama-bench", default=f"{LLAMA}/llama-bench")
    ap.add_argument("--llama-quantize", default=f"{LLAMA}/llama-quantize")
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--other-isas", default="", help="also rows forced to these paths (EMO_CPU_ISA), e.g. avx2,torch")
    ap.add_argument("--omp-active", action="store_true", help="also rows with spinning OpenMP threads "
                    "(OMP_WAIT_POLICY=ACTIVE), against emo-serve's PASSIVE default")
    ap.add_argument("--lm-head", choices=("quantized", "bf16"), default="quantized",
                    help="quantized (default): the int8 / int4 profiles quantize lm_head too (--quantize-lm-head) and "
                    "llama.cpp's Q8_0 / Q4_0 store their output matrix at the same type (--output-tensor-type), so "
                    "both read the same bits; bf16: lm_head stays bf16 in our profiles and llama-quantize's default "
                    "output type (Q8_0: q8_0, Q4_0: q6_K) is kept")
    ap.add_argument("--rounds", type=int, default=3, help="runs of our default row and llama.cpp, alternating "
                    "(the table gives medians)")
    ap.add_argument("--stored-layout", action="store_true", help="also the int8 / int4 rows with EMO_INTERLEAVE=0 "
                    "(the kernels read the mapped bytes as stored instead of the row-interleaved copy)")
    ap.add_argument("--split", action="store_true", help="also where a decoded token's time goes (a run per "
                    "precision with clocks around the native calls)")
    ap.add_argument("--skip-neighbour", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            write_base(Path(rest[0]), int(rest[1]))
            print("{}")
            return
        fn = {"ours": child_ours, "split": child_split, "bandwidth": child_bandwidth, "neighbour": child_neighbour}[kind]
        conv = {"bandwidth": [int], "neighbour": [int, int]}.get(kind, [str, int, int, int])
        print(json.dumps(fn(*[c(x) for c, x in zip(conv, rest)])))
        return

    from modeling import kernels

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base = root / f"qwen3-30b-a3b-shape-{args.layers}l"
    run_child("write", base, args.layers)
    res: dict = {"cpu": cpu_model(), "flags": cpu_flags(), "supported": kernels.supported(), "layers": args.layers,
                 "lm_head": args.lm_head,
                 "threads": args.threads, "prompt": args.prompt, "decode": args.decode, "rows": {}}
    print(f"CPU: {res['cpu']}; flags: {res['flags']}; kernel paths: {', '.join(res['supported'])}", file=sys.stderr)
    ggufs = {}
    have_llama = Path(args.llama_bench).is_file()
    for prec in args.precisions.split(","):
        lmq = prec != "bf16" and args.lm_head == "quantized"
        prof = root / f"qwen3-{args.layers}l-keep{KEEP}-{prec}{'-lmq' if lmq else ''}"
        res.setdefault("build", {})[prec] = build(base, prof, args.threads, None if prec == "bf16" else prec, lmq)
        variants: list[tuple[str, dict]] = []
        if args.omp_active:
            variants.append((" [OpenMP active]", {"OMP_WAIT_POLICY": "ACTIVE"}))
        if args.stored_layout and prec != "bf16":
            variants.append((" [stored layout]", {"EMO_INTERLEAVE": "0"}))
        if args.other_isas:
            variants += [(f" [{i}]", {"EMO_CPU_ISA": i}) for i in args.other_isas.split(",")]

        def ours(label: str, env: dict) -> None:
            r = run_child("ours", prof, args.threads, args.prompt, args.decode, env=env)
            key = f"ours {prec}{label}"
            res["rows"][key] = r
            res.setdefault("rounds", {}).setdefault(key, []).append(r)
            print(f"{key}: {r}", file=sys.stderr)

        gguf = None
        if have_llama:
            if prec == "bf16":
                gg = root / f"qwen3-{args.layers}l-bf16.gguf"
                if not gg.is_file():
                    export(prof, gg)
                ggufs["bf16"] = gg
            elif Path(args.llama_quantize).is_file() and "bf16" in ggufs:
                kind = {"int8": "Q8_0", "int4": "Q4_0"}[prec]
                gg = root / f"qwen3-{args.layers}l-{kind}{'-out' + kind if lmq else ''}.gguf"
                llama_quantize(args.llama_quantize, ggufs["bf16"], gg, kind, kind.lower() if lmq else None)
                ggufs[prec] = gg
            gguf = ggufs.get(prec)
        # emo-serve's defaults and llama.cpp right after each other, --rounds times (bandwidth drifts by up to 2x
        # within minutes here): the table gives the median of each
        for _ in range(args.rounds):
            ours("", {})
            if gguf is not None:
                warm_page_cache(gguf)
                r = run_llama_bench(args.llama_bench, str(gguf), args.threads, args.prompt, args.decode)
                res.setdefault("rounds", {}).setdefault(f"llama.cpp {prec}", []).append(r)
                print(f"llama.cpp {prec}: {r}", file=sys.stderr)
        for key in (f"ours {prec}", f"llama.cpp {prec}"):
            if key in res.get("rounds", {}):
                res["rows"][key] = median_row(res["rounds"][key])
        for label, env in variants:
            ours(label, env)
        if args.split:
            res.setdefault("split", {})[prec] = run_child("split", prof, args.threads, args.prompt, args.decode)
            print(f"split {prec}: {res['split'][prec]}", file=sys.stderr)
    res["bandwidth"] = run_child("bandwidth", args.threads)
    if not args.skip_neighbour and "int4" in args.precisions:
        prof = root / f"qwen3-{args.layers}l-keep{KEEP}-int4{'-lmq' if args.lm_head == 'quantized' else ''}"
        alone = res["rows"]["ours int4"]
        nb = subprocess.Popen([sys.executable, __file__, "--child", "neighbour", "2", "600"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            time.sleep(2)
            busy = run_child("ours", prof, args.threads, args.prompt, args.decode)
        finally:
            nb.kill()
            nb.wait()
        res["neighbour"] = {"alone": alone, "busy": busy}

    # -- the table ----------------------------------------------------------------------------------------
    read_bw = res["bandwidth"]["read_GBps"] * 1e9
    print(f"\nQwen3-30B-A3B shape, {args.layers} layers, {KEEP}-expert profile; {args.threads} threads; prompt "
          f"{args.prompt}, decode {args.decode}; lm_head of the int8 / int4 rows: {args.lm_head}\nCPU: {res['cpu']}\nflags: {res['flags']}\n"
          f"read bandwidth {res['bandwidth']['read_GBps']:.1f} GB/s, copy {res['bandwidth']['copy_GBps']:.1f} GB/s")
    print("| row | kernels | prefill tok/s | decode tok/s | vs llama.cpp (prefill / decode) | decode / memory floor |")
    print("|---|---|---|---|---|---|")
    for key, r in res["rows"].items():
        prec = key.split()[1]
        ll = res["rows"].get(f"llama.cpp {prec}")
        vs = "" if not ll or key.startswith("llama") else \
            f"{r['prefill_tok_s'] / ll['prefill_tok_s']:.2f}x / {r['decode_tok_s'] / ll['decode_tok_s']:.2f}x"
        floor = ""
        if "bytes_per_token" in r:
            f = read_bw / r["bytes_per_token"]
            floor = f"{r['decode_tok_s'] / f:.0%} of {f:.1f} tok/s ({r['bytes_per_token'] / 1e9:.2f} GB/token)"
        runs = f" (median of {r['runs']}: {', '.join(map(str, r['decode_runs']))})" if r.get("runs", 1) > 1 else ""
        print(f"| {key} | {r.get('kernels', 'llama.cpp')} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f}{runs} | {vs} "
              f"| {floor} |")
    if "neighbour" in res:
        a, b = res["neighbour"]["alone"], res["neighbour"]["busy"]
        print(f"int4 next to a busy 2-thread torch neighbour: decode {b['decode_tok_s']:.2f} vs {a['decode_tok_s']:.2f} "
              f"tok/s alone = {a['decode_tok_s'] / b['decode_tok_s']:.2f}x slower; prefill "
              f"{a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x slower")
    for prec, sp in res.get("split", {}).items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sp["split_ms"].items())
        print(f"where a decoded {prec} token goes ({sp['ms_per_token']:.1f} ms, with clocks): {parts} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
