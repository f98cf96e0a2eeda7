"""Selection methods and profile repairs side by side on the demo twins (reports/subset/repair.md).

    python -m subsetting.repair_report [--twins std,emo] [--keep 8] [--domains python,c,prose]
        [--distill-steps 100] [--finetune-steps 100] [--json reports/subset/repair.json]

(also `python -m subsetting.report --repairs ...`). Per twin, domain and keep:
experts chosen on that domain's calibration documents (the training split,
`runs/corpus/train.jsonl`, 64 documents of at most 256 tokens) by mean-prob,
output-aware, reap and easy-ep; then the mean-prob choice repaired by `merge`
alone and by `distill` followed by `finetune` (one run, evaluated after each
step), on the same calibration documents. Every repaired profile is written by
`write_profile` and read back, so a figure is the written profile's perplexity
(bf16 bytes) on

- the held-out split (`training/data/heldout.jsonl`), and
- third-party text nobody here chose (`subsetting.auto_rules.thirdparty_docs`:
  sources and licence texts of the installed Python packages),

as a ratio to the full model's. Time and peak RSS are per repair step, in this
process (the machine may be shared: the figures say so).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling import load_model
from training.repair import Repairer, RepairParams

from .auto_rules import thirdparty_docs
from .corpus import read_corpus, sample, tokenize
from .evaluate import perplexity
from .fingerprint import Fingerprinter, Layout
from .select import SELECTORS, Calibration, parse_keep
from .writer import write_profile

TWINS = {"std": ("standard MoE", "modeling/bundled/stdmoe-demo"), "emo": ("EMO", "modeling/bundled/emo-demo")}
SELECT = ("mean-prob", "output-aware", "reap", "easy-ep")


def _ppls(model, sets: dict[str, list[list[int]]], pool=None) -> dict[str, float]:
    return {k: perplexity(model, v, pool) for k, v in sets.items()}


def evaluate(twin: str, dom: str, keep: int, a, work: Path, log=print) -> dict:
    name, path = TWINS[twin]
    model = load_model(path, dtype="float32")
    layout = Layout.of(model)
    limit = min(a.max_tokens, model.config.max_position_embeddings)
    cdocs = sample([d for d in read_corpus([a.calib]) if d.domain == dom], a.calib_docs)
    cdocs, ctoks = tokenize(cdocs, model.tokenizer, limit)
    sets = {"heldout": tokenize([d for d in read_corpus([a.heldout]) if d.domain == dom], model.tokenizer, limit)[1],
            "thirdparty": tokenize([d for d in thirdparty_docs() if d.domain == dom], model.tokenizer, limit)[1]}
    full = _ppls(model, sets)
    fp = Fingerprinter(model, limit).fit(cdocs, ctoks).fingerprints_
    cal = Calibration(layout, fp, ctoks, model)
    k = parse_keep(keep, layout)
    row: dict = {"full": full, "calib_docs": len(cdocs), "calib_tokens": int(fp.tokens.sum()),
                 "tokens": {s: sum(len(t) for t in v) for s, v in sets.items()}, "select": {}, "repair": {}}
    kept = {}
    for m in SELECT:
        t0 = time.time()
        kept[m] = SELECTORS[m](k).fit(cal).experts_
        p = _ppls(model, sets, kept[m])
        row["select"][m] = {"ppl": p, "seconds": round(time.time() - t0, 2)}
        log(f"  {name} {dom} keep {keep} {m}: " + ", ".join(f"{s} {p[s] / full[s]:.3f}x" for s in sets))
    base = kept["mean-prob"]
    slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in base.items()}
    params = RepairParams(distill_steps=a.distill_steps, finetune_steps=a.finetune_steps, seed=0)

    def stage(label: str):
        done: list[str] = []

        def on_step_done(step, tensors):
            done.append(step)
            out = work / f"{twin}-{dom}-{keep}-{'-'.join(done)}"
            write_profile(model, out, out.name, base, overrides=tensors, force=True)
            p = _ppls(load_model(out, dtype="float32"), sets)
            row["repair"]["+".join(done)] = {"ppl": p}
            log(f"  {name} {dom} keep {keep} {'+'.join(done)}: "
                + ", ".join(f"{s} {p[s] / full[s]:.3f}x" for s in sets))
        return on_step_done

    for steps in (("merge",), ("distill", "finetune")):
        rep = Repairer(steps, params, on_step_done=stage("+".join(steps))).fit(model, slots, ctoks, teacher=model)
        for r in rep.record_["steps"]:
            key = "+".join(s["step"] for s in rep.record_["steps"][: rep.record_["steps"].index(r) + 1])
            row["repair"][key].update({k2: r[k2] for k2 in ("seconds", "peak_rss_bytes", "tokens", "loss_first",
                                                             "loss_last", "tokens_per_second", "mean_similarity")
                                       if k2 in r})
    return row


def geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def markdown(res: dict) -> str:
    meta = res["meta"]
    cols = [*SELECT, "merge", "distill", "distill+finetune"]
    out = [f"# Selection methods and profile repairs\n",
           f"Generated by `python -m subsetting.repair_report` ({meta['date']}, {meta['seconds']:.0f} s on a CPU "
           f"shared with other jobs; torch threads 1). Per twin and domain: the experts of each selection method "
           f"chosen on {meta['calib_docs']} calibration documents of the domain (at most {meta['max_tokens']} "
           f"tokens each, `{meta['calib']}`); the repairs start from mean-prob's choice and train on the same "
           f"documents (distill {meta['distill_steps']} steps, finetune {meta['finetune_steps']} steps, 4 "
           f"sequences of 256 tokens per step). Perplexity of the written profile (bf16) as a ratio to the full "
           f"model's, on the held-out split and on third-party text (`subsetting.auto_rules.thirdparty_docs`). "
           f"Raw numbers: `repair.json`." + (f" Run: {meta['note']}." if meta.get("note") else "") + "\n"]
    for s, title in (("thirdparty", "Third-party text"), ("heldout", "Held-out split")):
        out += [f"## {title}: perplexity ratio (profile / full)\n",
                "| twin | keep | domain | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for tw, per in res["results"].items():
            for keep, doms in per.items():
                ratios = {c: [] for c in cols}
                for dom, r in doms.items():
                    cells = []
                    for c in cols:
                        ent = r["select"].get(c) or r["repair"].get(c)
                        v = ent["ppl"][s] / r["full"][s] if ent else float("nan")
                        ratios[c].append(v)
                        cells.append(f"{v:.2f}x")
                    out.append(f"| {TWINS[tw][0]} | {keep} | {dom} | " + " | ".join(cells) + " |")
                out.append(f"| **{TWINS[tw][0]}** | {keep} | *geo. mean* | "
                           + " | ".join(f"**{geo(v):.2f}x**" for v in ratios.values()) + " |")
        out.append("")
    out += ["## Cost of each repair step\n", "| twin | keep | domain | step | seconds | peak RSS (MB) | tokens "
            "| tokens/s | loss first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    for tw, per in res["results"].items():
        for keep, doms in per.items():
            for dom, r in doms.items():
                for key, e in r["repair"].items():
                    step = key.split("+")[-1]
                    loss = f"{e['loss_first']:.3f} -> {e['loss_last']:.3f}" if e.get("loss_first") is not None else \
                        f"mean output similarity {e.get('mean_similarity')}"
                    out.append(f"| {TWINS[tw][0]} | {keep} | {dom} | {step} | {e.get('seconds', 0):.1f} | "
                               f"{e.get('peak_rss_bytes', 0) / 1e6:.0f} | {e.get('tokens', '-')} | "
                               f"{e.get('tokens_per_second', '-')} | {loss} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--twins", default="std,emo")
    ap.add_argument("--keep", default="8")
    ap.add_argument("--domains", default="python,c,prose")
    ap.add_argument("--calib", default="runs/corpus/train.jsonl")
    ap.add_argument("--heldout", default="training/data/heldout.jsonl")
    ap.add_argument("--calib-docs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--distill-steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--json", default="reports/subset/repair.json")
    ap.add_argument("--md", default="reports/subset/repair.md")
    ap.add_argument("--render", action="store_true", help="only re-render the markdown from --json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.render:
        res = json.loads(Path(a.json).read_text())
    else:
        t0 = time.time()
        res = {"meta": {"date": time.strftime("%Y-%m-%d"), **{k: getattr(a, k) for k in (
            "calib", "heldout", "calib_docs", "max_tokens", "distill_steps", "finetune_steps")}}, "results": {}}
        with tempfile.TemporaryDirectory(prefix="repair-report-") as work:
            for tw in a.twins.split(","):
                for keep in a.keep.split(","):
                    for dom in a.domains.split(","):
                        r = evaluate(tw, dom, int(keep), a, Path(work))
                        res["results"].setdefault(tw, {}).setdefault(keep, {})[dom] = r
                        res["meta"]["seconds"] = time.time() - t0
                        Path(a.json).write_text(json.dumps(res, indent=1))  # partial results survive a stop
    Path(a.md).write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
