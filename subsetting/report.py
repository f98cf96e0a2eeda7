"""The subsetting report on the bundled demo twins (reports/subset/README.md + PNG).

    python -m subsetting.report [--emo modeling/bundled/emo-demo] [--std modeling/bundled/stdmoe-demo]
        [--calib runs/corpus/train.jsonl] [--heldout training/data/heldout.jsonl] [--build-bundled]

Per twin and domain: experts chosen on calibration documents of that domain
(training split, never the held-out one) by each method, keeping 25% and 12.5%
of the experts; held-out perplexity of the pool-restricted model (equal to the
written profile's, as tests/test_subset.py checks) next to the full model and
random subsets (3 seeds). Then `discover` on the unlabelled held-out mixture,
scored by adjusted Rand index against the true domains. With --build-bundled,
the EMO twin's per-domain profiles are written by `emo-subset build`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from modeling import load_model

from .corpus import read_corpus, sample, tokenize
from .discover import DomainDiscovery
from .evaluate import perplexity
from .fingerprint import Fingerprinter, Layout
from .select import Calibration, LayerwiseSelector, MeanProbSelector, OutputAwareSelector, RandomSelector, parse_keep

METHODS = ["mean-prob", "layerwise", "output-aware", "random"]


def evaluate_twin(path: Path, calib, held, keeps, calib_docs, max_tokens, seeds=3, log=print) -> dict:
    model = load_model(path, dtype="float32")
    layout = Layout.of(model)
    domains = sorted({d.domain for d in held})
    max_tokens = min(max_tokens, model.config.max_position_embeddings)
    res = {"path": str(path), "experts": layout.num_original, "top_k": layout.top_k,
           "shared": [len(s) for s in layout.shared], "domains": {}}
    for dom in domains:
        t0 = time.time()
        cdocs = sample([d for d in calib if d.domain == dom], calib_docs)
        cdocs, ctoks = tokenize(cdocs, model.tokenizer, max_tokens)
        _, htoks = tokenize([d for d in held if d.domain == dom], model.tokenizer, max_tokens)
        fp = Fingerprinter(model, max_tokens).fit(cdocs, ctoks).fingerprints_
        row = {"full": perplexity(model, htoks), "calib_docs": len(cdocs), "calib_tokens": int(fp.tokens.sum()),
               "heldout_docs": len(htoks), "heldout_tokens": sum(len(t) for t in htoks)}
        for keep in keeps:
            k = parse_keep(keep, layout)
            out = {}
            cal = Calibration(layout, fp, ctoks, model)
            pools = {"mean-prob": MeanProbSelector(k).fit(cal).experts_,
                     "layerwise": LayerwiseSelector(k).fit(cal).experts_,
                     "output-aware": OutputAwareSelector(k).fit(cal).experts_}
            for m, pool in pools.items():
                out[m] = perplexity(model, htoks, pool)
            rnd = [perplexity(model, htoks, RandomSelector(k, seed=s).fit(Calibration(layout)).experts_) for s in range(seeds)]
            out["random"] = float(np.mean(rnd))
            out["random_seeds"] = rnd
            row[str(keep)] = out
        res["domains"][dom] = row
        log(f"  {path.name} {dom}: full {row['full']:.2f} " + " ".join(
            f"keep{kp}: " + ",".join(f"{m}={row[str(kp)][m]:.2f}" for m in METHODS) for kp in keeps)
            + f" ({time.time() - t0:.0f} s)")
    # discovery on the unlabelled held-out mixture
    hdocs, htoks = tokenize(held, model.tokenizer, max_tokens)
    fp = Fingerprinter(model, max_tokens).fit(hdocs, htoks).fingerprints_
    disc = {}
    for k in ("auto", len(domains)):
        dd = DomainDiscovery(k).fit(fp)
        s = dd.summary(fp)
        disc[str(k)] = {"k": s["k"], "ari": s["adjusted_rand_index"],
                        "clusters": [{"size": c["size"], "labels": c["labels"], "top_words": c["top_words"][:6]}
                                     for c in s["clusters"]]}
    res["discover"] = disc
    return res


QUANT_SCHEMES = ("int8", "int4")
QUANT_TARGETS = {"int8": 1.015, "int4": 1.10}


def evaluate_quantized(path: Path, calib, held, keep: int, calib_docs: int, max_tokens: int, work: Path,
                       log=print) -> dict:
    """Per domain: the mean-prob profile keeping `keep` experts per layer (the bundled one
    when the twin ships it), written again by `emo-subset quantize` as int8 and int4, and
    the held-out perplexity of all three (computed in float32, so only the stored weights differ)."""
    from modeling.quant import preset
    from modeling.quant.writer import quantize_checkpoint

    from .cli import main as subset_main

    domains = sorted({d.domain for d in held})
    out = {}
    for dom in domains:
        t0 = time.time()
        prof = path / "profiles" / dom
        if not (prof / "profile.json").is_file():
            prof = work / f"{path.name}-{dom}"
            code = subset_main(["build", str(path), "--out", str(prof), "--name", dom, "--corpus", calib, "--domain",
                                dom, "--keep", str(keep), "--max-docs", str(calib_docs), "--max-tokens",
                                str(max_tokens), "--force", "--quiet"])
            if code:
                raise SystemExit(f"building the {dom} profile of {path} failed")
        row = {"profile": str(prof)}
        model = load_model(prof, dtype="float32")
        _, htoks = tokenize([d for d in held if d.domain == dom], model.tokenizer,
                            min(max_tokens, model.config.max_position_embeddings))
        row["bf16"] = perplexity(model, htoks)
        for q in QUANT_SCHEMES:
            qdir = work / f"{path.name}-{dom}-{q}"
            summ = quantize_checkpoint(prof, qdir, preset(q), force=True)
            row[q] = perplexity(load_model(qdir, dtype="float32"), htoks)
            row[f"{q}_bytes"] = summ["bytes"]
        row["bf16_bytes"] = sum(f.stat().st_size for f in prof.glob("*.safetensors"))
        out[dom] = row
        log(f"  {path.name} {dom}: bf16 {row['bf16']:.3f} int8 {row['int8']:.3f} int4 {row['int4']:.3f} "
            f"({time.time() - t0:.0f} s)")
    return out


def quantized_section(results: dict) -> list[str]:
    twins = [tw for tw in results if results[tw].get("quantized")]
    if not twins:
        return []
    lines = ["## Quantized profiles (compressed-tensors int8 / int4)", "",
             "The per-domain mean-prob profiles (8 of 32 experts per layer; the EMO twin's are the bundled ones) "
             "rewritten by `emo-subset quantize --quantize int8` (per output channel) and `--quantize int4` "
             "(groups of 128 inputs, symmetric); router, norms and embeddings stay bf16. Held-out perplexity, "
             "computed in float32 so that only the stored weights differ; the ratio is to the bf16 profile "
             "(targets: int8 within 1.5%, int4 within 10%). Sizes are of the shard files.", "",
             "| twin | domain | bf16 profile | int8 | int4 | MB bf16 / int8 / int4 |", "|---|---|---|---|---|---|"]
    for tw in twins:
        rat = {q: [] for q in QUANT_SCHEMES}
        for dom, r in results[tw]["quantized"].items():
            cells = []
            for q in QUANT_SCHEMES:
                rat[q].append(r[q] / r["bf16"])
                cells.append(f"{r[q]:.3f} ({r[q] / r['bf16']:.4f}x)")
            mb = " / ".join(f"{r[k] / 1e6:.2f}" for k in ("bf16_bytes", "int8_bytes", "int4_bytes"))
            lines.append(f"| {tw} | {dom} | {r['bf16']:.3f} | " + " | ".join(cells) + f" | {mb} |")
        gm = {q: math.exp(np.mean(np.log(v))) for q, v in rat.items()}
        verdict = ", ".join(f"{q} {'meets' if max(rat[q]) <= QUANT_TARGETS[q] else 'misses'} its target "
                            f"(worst {max(rat[q]):.4f}x)" for q in QUANT_SCHEMES)
        lines.append(f"| **{tw}** | *geo. mean ratio* | 1.00 | " + " | ".join(f"**{gm[q]:.4f}x**" for q in QUANT_SCHEMES)
                     + f" | {verdict} |")
    return lines + [""]


def write_report(results: dict, out: Path, keeps, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    twins = list(results)
    lines = ["# Expert subsets of the demo twins", "",
             f"Generated by `python -m subsetting.report` ({meta['date']}, {meta['seconds']:.0f} s). "
             "Held-out perplexity (training/data/heldout.jsonl, never used for selection) of the model routed "
             "only inside a per-domain expert pool, chosen on that domain's calibration documents "
             f"(`{meta['calib']}`, up to {meta['calib_docs']} documents of at most {meta['max_tokens']} tokens per domain). "
             "A profile folder's logits equal these pool-restricted logits (tests/test_subset.py), so this is the "
             "written profile's perplexity. `random` is the mean of 3 seeded random pools of the same size; shared "
             "experts are always kept and count toward the size. Lower is better; the ratio is profile / full.", ""]
    summary = {}
    for keep in keeps:
        lines += [f"## Keeping {keep} of {results[twins[0]]['experts'][0]} experts per layer", ""]
        lines += ["| twin | domain | full | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
        for tw in twins:
            ratios = {m: [] for m in METHODS}
            for dom, row in results[tw]["domains"].items():
                r = row[str(keep)]
                cells = []
                for m in METHODS:
                    ratios[m].append(r[m] / row["full"])
                    cells.append(f"{r[m]:.2f} ({r[m] / row['full']:.2f}x)")
                lines.append(f"| {tw} | {dom} | {row['full']:.2f} | " + " | ".join(cells) + " |")
            gm = {m: math.exp(np.mean(np.log(v))) for m, v in ratios.items()}
            summary[(tw, keep)] = gm
            lines.append(f"| **{tw}** | *geo. mean ratio* | 1.00 | " + " | ".join(f"**{gm[m]:.2f}x**" for m in METHODS) + " |")
        lines.append("")
    lines += ["## Summary: perplexity ratio (profile / full), geometric mean over domains", "",
              "| twin | keep | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for (tw, keep), gm in summary.items():
        lines.append(f"| {tw} | {keep} | " + " | ".join(f"{gm[m]:.2f}" for m in METHODS) + " |")
    lines += ["", "![perplexity ratio per method](subset_ppl.png)", ""]
    lines += quantized_section(results)
    lines += [
              "## Domain discovery on the unlabelled held-out mixture", "",
              "`emo-subset discover` pipeline (document fingerprints, PCA, L2 normalisation, spherical k-means) on "
              "the held-out documents without their labels, scored against the true domains.", "",
              "| twin | k | adjusted Rand index | clusters (size: true labels) |", "|---|---|---|---|"]
    for tw in twins:
        for kk, d in results[tw]["discover"].items():
            cl = "; ".join(f"{c['size']}: " + ", ".join(f"{a} {b}" for a, b in c["labels"].items()) for c in d["clusters"])
            lines.append(f"| {tw} | {d['k']}{' (auto)' if kk == 'auto' else ''} | {d['ari']:.3f} | {cl} |")
    lines += ["", "Raw numbers: `results.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(keeps), figsize=(5 * len(keeps), 3.8), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, keep in zip(axes, keeps):
        x = np.arange(len(METHODS))
        for n, tw in enumerate(twins):
            vals = [summary[(tw, keep)][m] for m in METHODS]
            ax.bar(x + (n - (len(twins) - 1) / 2) * 0.38, vals, 0.38, label=tw)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(x, METHODS)
        ax.set_title(f"keep {keep} of {results[twins[0]]['experts'][0]} experts")
        ax.set_ylabel("held-out perplexity / full model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "subset_ppl.png", dpi=110)


def build_bundled(model: Path, calib: str, domains: list[str], keep: int, calib_docs: int, max_tokens: int) -> None:
    from .cli import main

    for dom in domains:
        code = main(["build", str(model), "--out", str(model / "profiles" / dom), "--name", dom, "--corpus", calib,
                     "--domain", dom, "--keep", str(keep), "--max-docs", str(calib_docs), "--max-tokens",
                     str(max_tokens), "--force", "--quiet"])
        if code:
            raise SystemExit(f"building the {dom} profile failed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emo", default="modeling/bundled/emo-demo")
    ap.add_argument("--std", default="modeling/bundled/stdmoe-demo")
    ap.add_argument("--calib", default="runs/corpus/train.jsonl")
    ap.add_argument("--heldout", default="training/data/heldout.jsonl")
    ap.add_argument("--out", default="reports/subset")
    ap.add_argument("--calib-docs", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--keep", default="8,4", help="experts kept per layer, comma-separated levels")
    ap.add_argument("--build-bundled", action="store_true")
    ap.add_argument("--quantized", action="store_true",
                    help="only add the int8 / int4 columns to an existing results.json (and re-render the report)")
    ap.add_argument("--work", default=None, help="scratch folder for the quantized profiles (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is much faster when other jobs share the cores)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.time()
    keeps = [int(k) for k in a.keep.split(",")]
    calib, held = read_corpus([a.calib]), read_corpus([a.heldout])
    if a.quantized:
        import tempfile

        prev = json.loads((Path(a.out) / "results.json").read_text())
        results, meta = prev["results"], prev["meta"]
        work = Path(a.work or tempfile.mkdtemp(prefix="emo-quant-report-"))
        for name, path in (("EMO", a.emo), ("standard MoE", a.std)):
            print(f"quantized profiles of the {name} twin ({path})", flush=True)
            results[name]["quantized"] = evaluate_quantized(Path(path), a.calib, held, keeps[0], a.calib_docs,
                                                            a.max_tokens, work)
        meta["quantized_date"] = time.strftime("%Y-%m-%d")
        meta["quantized_seconds"] = time.time() - t0
        prev_keeps = sorted({int(k) for r in results.values() for row in r["domains"].values()
                             for k in row if k.isdigit()}, reverse=True)
        write_report(results, Path(a.out), prev_keeps, meta)
        print(f"wrote {a.out}/README.md in {time.time() - t0:.0f} s")
        return
    results = {}
    for name, path in (("EMO", a.emo), ("standard MoE", a.std)):
        print(f"evaluating {name} twin ({path})", flush=True)
        results[name] = evaluate_twin(Path(path), calib, held, keeps, a.calib_docs, a.max_tokens)
    meta = {"date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0, "calib": a.calib, "heldout": a.heldout,
            "calib_docs": a.calib_docs, "max_tokens": a.max_tokens, "emo": a.emo, "std": a.std}
    write_report(results, Path(a.out), keeps, meta)
    if a.build_bundled:
        build_bundled(Path(a.emo), a.calib, sorted({d.domain for d in held}), keeps[0], 64, a.max_tokens)
    print(f"wrote {a.out}/README.md in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
