"""One decoded token's matrix-vector products: weight bytes read per second by the native kernels, for
bf16, int8 and int4, measured side by side (alternating) in one run: the stored layout read row by row
(bf16's default), in quantized pairs or in 4-row tiles, and int8 / int4 with their rows interleaved by 4
(their default: the copy made at first use).

With --threads 1 the clock is the thread's CPU time (what the kernel costs a core, unaffected by a busy
machine's scheduling); with more, wall time. The matrix (--rows x --cols, 64k x 2048 by default) is
larger than any L3 cache, so the figures are memory (or, for int4, compute) bound.

Usage: flock /tmp/emo-bench.lock python benchmarks/bench_gemv.py [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    from modeling.kernels import extension, native_matrix
    from modeling.quant import PackedLinear, WeightScheme

    ext = extension()
    if ext is None:
        sys.exit("the native extension is not built")
    torch.set_num_threads(args.threads)
    ext.set_threads(args.threads)
    N, K = args.rows, args.cols
    g = torch.Generator().manual_seed(0)

    def packed(bits: int, group: int | None) -> PackedLinear:
        per = 32 // bits
        q = torch.randint(0, 1 << bits, (N, K // per, per), generator=g, dtype=torch.int64)
        words = torch.zeros(N, K // per, dtype=torch.int64)
        for i in range(per):
            words |= q[..., i] << (bits * i)
        scale = torch.rand(N, 1 if group is None else K // group, generator=g).bfloat16() * 0.01
        return PackedLinear("w", WeightScheme(bits, group, True), (N, K), words.to(torch.int32), scale, None, [])

    def quantized(bits: int, group: int | None) -> tuple:
        w = packed(bits, group)
        stored = ext.int8(w.packed.view(torch.uint8).view(N, -1), K, w.scale, False, "w") if bits == 8 else \
            ext.int4(w.packed.view(torch.uint8).view(N, -1), K, w.scale, None, group, "w")
        inter = native_matrix(ext, w, "w")  # the default: rows interleaved by 4
        assert inter.interleaved, "the ISA in use reads the stored layout only"
        return stored, inter

    i8, i4 = quantized(8, None), quantized(4, 128)
    mats = {"bf16": (ext.dense((torch.randn(N, K, generator=g) * 0.05).bfloat16(), "w"), None, N * K * 2),
            "int8": (*i8, N * K), "int4": (*i4, N * K // 2)}
    x = torch.randn(1, K, generator=g).bfloat16()
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    best: dict[tuple[str, str], float] = {}

    def timed(name: str, how: str, mat, nbytes: int) -> None:
        ext.linear(x, mat)
        t0 = clock()
        for _ in range(args.reps):
            ext.linear(x, mat)
        best[name, how] = max(best.get((name, how), 0.0), nbytes * args.reps / (clock() - t0) / 1e9)

    for _ in range(args.rounds):
        for name, (stored, inter, nbytes) in mats.items():
            for streams, how in ((1, "rows"), (2, "pairs"), (0, "tiles")):
                ext.set_decode_streams(streams)
                timed(name, how, stored, nbytes)
            ext.set_decode_streams(1)
            if inter is not None:
                timed(name, "interleaved", inter, nbytes)
    print(f"{N} x {K} matrix, one activation row, {args.threads} thread(s), "
          f"{'CPU time' if args.threads == 1 else 'wall time'}; best of {args.rounds} rounds of {args.reps}")
    print("| weights | stored: rows one by one GB/s | stored: quantized rows in pairs GB/s | stored: 4-row tiles GB/s "
          "| interleaved by 4 (the int8 / int4 default) GB/s |")
    print("|---|---|---|---|---|")
    for name in mats:
        inter = f"{best[name, 'interleaved']:.1f}" if (name, "interleaved") in best else "-"
        print(f"| {name} | {best[name, 'rows']:.1f} | {best[name, 'pairs']:.1f} | {best[name, 'tiles']:.1f} | {inter} |")


if __name__ == "__main__":
    main()
