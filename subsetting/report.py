"""The subsetting report on the bundled demo twins (reports/subset/README.md + PNG).

    python -m subsetting.report [--emo modeling/bundled/emo-demo] [--std modeling/bundled/stdmoe-demo]
        [--calib runs/corpus/train.jsonl] [--heldout training/data/heldout.jsonl] [--build-bundled]
    python -m subsetting.report --repairs [subsetting.repair_report's options]

Per twin and domain: experts chosen on calibration documents of that domain
(training split, never the held-out one) by each method, keeping 25% and 12.5%
of the experts; held-out perplexity of the pool-restricted model (equal to the
written profile's, as tests/test_subset.py checks) next to the full model and
random subsets (3 seeds). Then `discover` on the unlabelled held-out mixture,
scored by adjusted Rand index against the true domains. With --build-bundled,
the EMO twin's per-domain profiles are written by `emo-subset build`. With
--repairs: the selection methods reap and easy-ep and the profile repairs
(merge, distill, finetune) on both twins (`subsetting.repair_report`,
reports/subset/repair.md).
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


def evaluate_twin(path: Path, calib, held, keeps, calib_docs, max_tokens, seeds=3, log=print,
                  domains: list[str] | None = None, discover: bool = True) -> dict:
    model = load_model(path, dtype="float32")
    layout = Layout.of(model)
    domains = domains or sorted({d.domain for d in held})
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
    if not discover:
        return res
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


def write_report(results: dict, out: Path, keeps, meta: dict, control: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "control": control}, indent=1))
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
        for kk, d in results[tw].get("discover", {}).items():
            cl = "; ".join(f"{c['size']}: " + ", ".join(f"{a} {b}" for a, b in c["labels"].items()) for c in d["clusters"])
            lines.append(f"| {tw} | {d['k']}{' (auto)' if kk == 'auto' else ''} | {d['ari']:.3f} | {cl} |")
    if control:
        lines += control_markdown(control, meta)
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
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--repairs" in argv:  # the selection methods and repairs side by side: subsetting.repair_report
        from .repair_report import main as repairs

        argv.remove("--repairs")
        return repairs(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emo", default="modeling/bundled/emo-demo")
    ap.add_argument("--std", default="modeling/bundled/stdmoe-demo")
    ap.add_argument("--calib", default="runs/corpus/train.jsonl")
    ap.add_argument("--heldout", default="training/data/heldout.jsonl")
    ap.add_argument("--out", default="reports/subset")
    ap.add_argument("--calib-docs", type=int, default=64, help="calibration documents per domain (the bundled "
                    "profiles were built from 64)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--keep", default="8,4", help="experts kept per layer, comma-separated levels")
    ap.add_argument("--exclude-keep", default="24,16", help="experts kept by the exclusion profiles, levels")
    ap.add_argument("--build-bundled", action="store_true")
    ap.add_argument("--part", default="all", choices=["all", "EMO", "standard MoE", "control"],
                    help="run one part only (with --partial), to split the work over processes")
    ap.add_argument("--domains", default=None, help="only these domains of the twins (comma-separated)")
    ap.add_argument("--no-discover", action="store_true", help="skip domain discovery in this part")
    ap.add_argument("--partial", default=None, help="write this part's numbers to a JSON file, no report")
    ap.add_argument("--render", nargs="+", default=None, help="merge part files and write the report")
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
    meta = {"date": time.strftime("%Y-%m-%d"), "calib": a.calib, "heldout": a.heldout,
            "calib_docs": a.calib_docs, "max_tokens": a.max_tokens, "emo": a.emo, "std": a.std, "keeps": keeps}
    if a.render:  # merge the parts of a split run and write the report
        results, control, seconds = {}, None, 0.0
        for f in a.render:
            part = json.loads(Path(f).read_text())
            for tw, r in part.get("results", {}).items():
                have = results.setdefault(tw, {k: v for k, v in r.items() if k != "domains"} | {"domains": {}})
                have["domains"].update(r["domains"])
                if "discover" in r:
                    have["discover"] = r["discover"]
            control = part.get("control") or control
            seconds += part.get("seconds", 0.0)
        for r in results.values():
            r["domains"] = dict(sorted(r["domains"].items()))
        write_report(results, Path(a.out), keeps, {**meta, "seconds": seconds, "split": True}, control)
        print(f"wrote {a.out}/README.md from {len(a.render)} parts")
        return
    calib, held = read_corpus([a.calib]), read_corpus([a.heldout])
    results, control = {}, None
    doms = a.domains.split(",") if a.domains else None
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
        write_report(results, Path(a.out), prev_keeps, meta, prev.get("control"))
        print(f"wrote {a.out}/README.md in {time.time() - t0:.0f} s")
        return
    for name, path in (("EMO", a.emo), ("standard MoE", a.std)):
        if a.part not in ("all", name):
            continue
        print(f"evaluating {name} twin ({path})", flush=True)
        results[name] = evaluate_twin(Path(path), calib, held, keeps, a.calib_docs, a.max_tokens, domains=doms,
                                      discover=not a.no_discover)
    if a.part in ("all", "control"):
        print("the shipped profiles, exclusion profiles and auto rules of the EMO twin", flush=True)
        control = evaluate_control(Path(a.emo), calib, held, a.calib_docs, a.max_tokens, a.exclude_keep)
    if a.partial:
        Path(a.partial).write_text(json.dumps({"results": results, "control": control,
                                               "seconds": time.time() - t0}, indent=1))
        print(f"wrote part {a.partial} in {time.time() - t0:.0f} s")
        return
    write_report(results, Path(a.out), keeps, {**meta, "seconds": time.time() - t0}, control)
    if a.build_bundled:
        build_bundled(Path(a.emo), a.calib, sorted({d.domain for d in held}), keeps[0], 64, a.max_tokens)
    print(f"wrote {a.out}/README.md in {time.time() - t0:.0f} s")


# -- the shipped profiles, exclusion profiles, "auto" -------------------------------------------


def _changed(a: dict, b: dict) -> int:
    """Kept experts that differ between two selections of the same sizes, over all layers."""
    return sum(len(set(a[i]) ^ set(b[i])) // 2 for i in a)


def evaluate_control(emo: Path, calib, held, calib_docs: int, max_tokens: int, exclude_keep: str, log=print) -> dict:
    """On the EMO twin: (1) each bundled profile as shipped (its kept experts read from
    profile.json) on its domain's held-out text, next to the selection re-made here
    from the same number of calibration documents and from half as many, with the
    selection's stability under resampling; (2) exclusion profiles for every domain;
    (3) the rules of profile "auto" side by side."""
    from modeling import ProfileManifest

    from . import auto_rules
    from .select import ExcludeDomainSelector
    from .stability import resample_stability

    model = load_model(emo, dtype="float32")
    layout = Layout.of(model)
    max_tokens = min(max_tokens, model.config.max_position_embeddings)
    domains = sorted({d.domain for d in held})
    # one balanced calibration set: calib_docs documents of every domain
    docs = [d for dom in domains for d in sample([x for x in calib if x.domain == dom], calib_docs)]
    docs, toks = tokenize(docs, model.tokenizer, max_tokens)
    fp = Fingerprinter(model, max_tokens).fit(docs, toks).fingerprints_
    labels = np.array(fp.labels)
    htoks = {dom: tokenize([d for d in held if d.domain == dom], model.tokenizer, max_tokens)[1] for dom in domains}
    full = {dom: perplexity(model, htoks[dom]) for dom in domains}

    shipped = []
    for folder in sorted((emo / "profiles").iterdir()):
        if not (folder / "profile.json").is_file():
            continue
        man = ProfileManifest.read(folder)
        dom = (man.calibration.get("domains") or [man.name])[0]
        pool = man.pool()
        keep = {i: len(v) for i, v in pool.items()}
        mine = np.flatnonzero(labels == dom)
        half = [j for j in mine if fp.texts[j] in {d.text[:20000] for d in sample(
            [x for x in calib if x.domain == dom], calib_docs // 2)}]
        cal = Calibration(layout, fp.subset(mine))
        sel = MeanProbSelector(keep).fit(cal)
        sel_half = MeanProbSelector(keep).fit(Calibration(layout, fp.subset(half)))
        stab = resample_stability(sel, cal, resamples=16)
        row = {"profile": man.name, "domain": dom, "method": man.selection.get("method"),
               "calib_docs": man.calibration.get("documents"), "experts": sum(len(v) for v in pool.values()),
               "ratio": perplexity(model, htoks[dom], pool) / full[dom],
               "remade_changed": _changed(pool, sel.experts_), "remade_docs": len(mine),
               "remade_ratio": perplexity(model, htoks[dom], sel.experts_) / full[dom],
               "half_docs": len(half), "half_changed": _changed(pool, sel_half.experts_),
               "half_ratio": perplexity(model, htoks[dom], sel_half.experts_) / full[dom],
               "stability": stab.to_dict()}
        shipped.append(row)
        log(f"  shipped {man.name}: {row['ratio']:.3f}x; remade {row['remade_ratio']:.3f}x "
            f"({row['remade_changed']} changed), {row['half_docs']} docs {row['half_ratio']:.3f}x; "
            f"stability {stab.changed_mean:.2f} changed")

    exclusion = []
    for keep in [int(k) for k in str(exclude_keep).split(",")]:
        for x in domains:
            sel = ExcludeDomainSelector(parse_keep(keep, layout), exclude=x).fit(Calibration(layout, fp))
            ratios = {dom: perplexity(model, htoks[dom], sel.experts_) / full[dom] for dom in domains}
            kept = {d: r - 1 for d, r in ratios.items() if d != x}
            worst = max(kept, key=kept.get)
            exclusion.append({"keep": keep, "excluded": x, "ratios": ratios, "worst_kept": worst,
                              "rise_excluded": ratios[x] - 1, "rise_worst_kept": kept[worst],
                              "rise_ratio": (ratios[x] - 1) / kept[worst] if kept[worst] > 0 else 1e9})
            log(f"  exclude {x} keep {keep}: " + ", ".join(f"{d} {r:.3f}x" for d, r in ratios.items()))
    del model
    log("  auto rules (held-out split and third-party text)")
    auto = auto_rules.run(max_tokens)
    return {"calib_docs": calib_docs, "shipped": shipped, "exclusion": exclusion, "auto": auto,
            "full_ppl": full, "experts": layout.num_original[layout.moe_layers[0]]}


def control_markdown(c: dict, meta: dict) -> list[str]:
    from . import auto_rules
    from .stability import UNSTABLE_SHARE

    E = c["experts"]
    lines = ["", "## The profiles that ship (EMO twin)", "",
             "`modeling/bundled/emo-demo/profiles/*`, built by `emo-subset build --keep 8 --max-docs "
             f"{c['shipped'][0]['calib_docs']}` (mean-prob) on each domain's calibration documents. Held-out perplexity of the "
             "profile as shipped (its kept experts read from profile.json) against the full model, next to the "
             f"selection re-made here from the same {c['calib_docs']} documents and from half as many. "
             "Stability: the selection refit on 16 bootstrap resamples of its calibration documents; "
             f"kept experts that change (of the routed ones kept), flagged unstable above {UNSTABLE_SHARE:.0%} "
             "(`emo-subset build` records the same in profile.json and warns).", "",
             "| profile | calibration docs | held-out ppl / full | re-made here: experts changed, ppl / full "
             f"| from {c['calib_docs'] // 2} docs: experts changed, ppl / full | stability: changed on resampling "
             "(mean / max of kept) | |", "|---|---|---|---|---|---|---|"]
    for r in c["shipped"]:
        st = r["stability"]
        lines.append(f"| {r['profile']} | {r['calib_docs']} | **{r['ratio']:.2f}x** | {r['remade_changed']}, "
                     f"{r['remade_ratio']:.2f}x | {r['half_changed']}, {r['half_ratio']:.2f}x | "
                     f"{st['changed_mean']:.2f} / {st['changed_max']} of {st['kept_routed']} | "
                     f"{'stable' if st['changed_share'] <= UNSTABLE_SHARE else '**unstable**'} |")
    lines += ["", "## Exclusion profiles: everything but one domain (EMO twin)", "",
              "`emo-subset build MODEL --corpus CALIB --exclude-domain X --keep N`: calibration on every domain "
              f"({c['calib_docs']} documents each); an expert's score is how much more X's tokens route to it than "
              "the tokens of the kept domain that uses it most; the lowest-scoring N are kept. Held-out perplexity "
              "of each domain under the profile, as a ratio to the full model; the rise is ratio - 1, and the last "
              "column is the excluded domain's rise over the largest rise of a kept domain (target: at least 2x).", ""]
    keeps = sorted({e["keep"] for e in c["exclusion"]}, reverse=True)
    doms = list(c["exclusion"][0]["ratios"])
    for keep in keeps:
        lines += [f"Keeping {keep} of {E} experts per layer:", "",
                  "| excluded | " + " | ".join(doms) + " | excluded rise / worst kept rise |",
                  "|---|" + "---|" * len(doms) + "---|"]
        for e in [e for e in c["exclusion"] if e["keep"] == keep]:
            cells = [f"**{e['ratios'][d]:.2f}x**" if d == e["excluded"] else f"{e['ratios'][d]:.2f}x" for d in doms]
            ratio = "no kept domain rises" if e["rise_worst_kept"] <= 0 else f"{e['rise_ratio']:.1f}x"
            lines.append(f"| {e['excluded']} | " + " | ".join(cells) + f" | {ratio} "
                         f"({'meets' if e['rise_ratio'] >= 2 else 'misses'} 2x) |")
        lines.append("")
    lines += ["## Profile \"auto\": rules side by side", "",
              "Which hosted profile `\"profile\": \"auto\"` picks for a prompt (first 256 tokens), against the "
              "text's true domain, on the bundled demo with its four shipped profiles: `affinity` (the most of the "
              "full router's mass inside the profile's pool, the same measure `/v1/routing` reports), `centroid` "
              "(nearest centroid fingerprint, the rule before) and `perplexity` (least prompt perplexity under the "
              "profile, one forward per profile). Third-party text: Python and C sources, licence texts and "
              "numeric CSV tables of the packages installed beside emo-serve (`python -m subsetting.auto_rules`). "
              "The server's default is the rule with the most right over both sets: `--auto-rule`.", "",
              auto_rules.markdown(c["auto"]), ""]
    return lines


if __name__ == "__main__":
    main()
