"""Selection methods and profile repairs side by side on the demo twins (reports/subset/repair.md).

    python -m subsetting.repair_report [--twins std,emo] [--keep 8,4,16] [--domains python,c,prose]
        [--distill-steps 20] [--finetune-steps 20] [--runs distill+finetune,...]
        [--cells runs/repair-report] [--render]

(also `python -m subsetting.report --repairs ...`; `runs/corpus` first:
`python -m training.corpus --out runs/corpus`). One *cell* is a twin, a keep
(experts per MoE layer, of 32) and a domain. In each cell the experts are
chosen on that domain's calibration documents (the training split,
`runs/corpus/train.jsonl`, 64 documents of at most 256 tokens) by mean-prob,
reap and easy-ep (and any `--methods`); mean-prob's choice is then repaired,
on the same documents, by three runs, each evaluated after every step:

- merge -> distill -> finetune (columns merge, merge+distill, merge+distill+finetune),
- distill -> finetune (columns distill, distill+finetune),
- finetune alone,

and, as the control that lets a ratio below 1 be read, the FULL model
fine-tuned with the same steps and data (`full+finetune`): a profile near that
control has been repaired *and* adapted to the domain; the control's own ratio
is what adaptation alone buys. Every repaired model is written by
`write_profile` and read back, so a figure is the written checkpoint's
perplexity (bf16 bytes) on

- the held-out split (`training/data/heldout.jsonl`), and
- third-party text nobody here chose (`subsetting.auto_rules.thirdparty_docs`:
  sources and licence texts of the installed Python packages),

as a ratio to the full model's. Time and peak RSS are per repair step, in this
process (the machine may be shared: the figures say so).

Resumable: each cell's results go to `CELLS/<twin>-<keep>-<domain>.json` as
every part of it finishes (a selection method, one repair run, the control),
together with the settings they were measured with; a later run with the same
settings skips what is there, a run with other settings starts the cell again.
Several processes may work on different cells (e.g. `--twins std` and
`--twins emo` side by side). `--render` (or every run at its end) assembles
`--json` and `--md` from the cells of `--twins`, `--keep` and `--domains`;
a cell or part not measured is shown as "not run".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

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
SELECT = ("mean-prob", "reap", "easy-ep")
CHAINS = (("distill", "finetune"), ("merge", "distill", "finetune"), ("finetune",))  # each repairs mean-prob's choice
CONTROL = "full+finetune"
RUNS = (*("+".join(c) for c in CHAINS), CONTROL)
COLUMNS = ("merge", "distill", "finetune", "distill+finetune", "merge+distill+finetune")


def per_keep(spec: str) -> dict[int, int] | int:
    """`40` (every keep) or `8:40,4:20,16:20` (steps per keep)."""
    if ":" not in spec:
        return int(spec)
    return {int(k): int(v) for k, v in (p.split(":") for p in spec.split(","))}


def steps_for(spec: dict[int, int] | int, keep: int) -> int:
    if isinstance(spec, int):
        return spec
    if keep not in spec:
        raise SystemExit(f"no step count for keep {keep} in {spec}")
    return spec[keep]


def cell_settings(a, keep: int) -> dict:
    """What a cell's figures depend on: a cached cell is reused only under the same settings."""
    return {"calib": a.calib, "heldout": a.heldout, "calib_docs": a.calib_docs, "max_tokens": a.max_tokens,
            "distill_steps": steps_for(a.distill_steps, keep), "finetune_steps": steps_for(a.finetune_steps, keep),
            "seed": 0}


def _sans_steps(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if not k.endswith("_steps")}


class Cell:
    """One twin x keep x domain: its json file, rewritten (atomically) as each part is done."""

    def __init__(self, root: Path, twin: str, keep: int, dom: str, settings: dict):
        self.path = Path(root) / f"{twin}-{keep}-{dom}.json"
        self.settings = settings
        old = json.loads(self.path.read_text()) if self.path.exists() else None
        if old is None or _sans_steps(old.get("settings", {})) != _sans_steps(settings):
            old = {"settings": settings, "done": [], "select": {}, "repair": {}, "seconds": 0.0}
        elif old["settings"] != settings:  # other step counts: the selections stand, the repairs are redone
            old.update(settings=settings, repair={}, done=[p for p in old["done"] if p == "full" or
                                                            p.startswith("select:")])
        self.data = old

    def done(self, part: str) -> bool:
        return part in self.data["done"]

    def borrow_control(self) -> bool:
        """The control does not depend on keep: take it from a cell of the same twin and domain
        measured with the same data and finetune steps, if there is one."""
        twin, _, dom = self.path.stem.split("-")
        mine = {k: v for k, v in self.settings.items() if k != "distill_steps"}
        for other in sorted(self.path.parent.glob(f"{twin}-*-{dom}.json")):
            d = json.loads(other.read_text())
            if other != self.path and CONTROL in d["done"] and \
                    {k: v for k, v in d["settings"].items() if k != "distill_steps"} == mine:
                self.data["repair"][CONTROL] = {**d["repair"][CONTROL], "measured_in": other.name}
                self.finish(CONTROL, 0.0)
                return True
        return False

    def finish(self, part: str, seconds: float) -> None:
        self.data["done"].append(part)
        self.data["seconds"] = round(self.data["seconds"] + seconds, 1)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _ppls(model, sets: dict[str, list[list[int]]], pool=None) -> dict[str, float]:
    return {k: perplexity(model, v, pool) for k, v in sets.items()}


def _step_cost(r: dict) -> dict:
    return {k: r[k] for k in ("steps", "seconds", "peak_rss_bytes", "tokens", "loss_first", "loss_last",
                              "tokens_per_second", "mean_similarity") if k in r}


def run_cell(cell: Cell, twin: str, dom: str, keep: int, methods: tuple[str, ...], runs: tuple[str, ...],
             work: Path, log=print) -> dict:
    """Measure the parts of `cell` not yet done (see the module docstring)."""
    name, path = TWINS[twin]
    st, d = cell.settings, cell.data
    model = load_model(path, dtype="float32")
    layout = Layout.of(model)
    limit = min(st["max_tokens"], model.config.max_position_embeddings)
    cdocs = sample([x for x in read_corpus([st["calib"]]) if x.domain == dom], st["calib_docs"])
    if not cdocs:
        raise SystemExit(f"{st['calib']}: no {dom} documents")
    cdocs, ctoks = tokenize(cdocs, model.tokenizer, limit)
    sets = {"heldout": tokenize([x for x in read_corpus([st["heldout"]]) if x.domain == dom], model.tokenizer,
                                limit)[1],
            "thirdparty": tokenize([x for x in thirdparty_docs() if x.domain == dom], model.tokenizer, limit)[1]}
    tag = f"{name} {dom} keep {keep}"

    def ratios(p):
        return ", ".join(f"{s} {p[s] / d['full'][s]:.3f}x" for s in sets)

    if not cell.done("full"):
        t0 = time.time()
        d.update(full=_ppls(model, sets), calib_docs=len(cdocs), calib_tokens=int(sum(len(t) for t in ctoks)),
                 tokens={s: sum(len(t) for t in v) for s, v in sets.items()})
        cell.finish("full", time.time() - t0)
    todo = [m for m in methods if not cell.done(f"select:{m}")]
    if todo or "kept" not in d:
        fp = Fingerprinter(model, limit).fit(cdocs, ctoks).fingerprints_
        cal = Calibration(layout, fp, ctoks, model)
        k = parse_keep(keep, layout)
        if "kept" not in d:  # the experts the repairs start from
            d["kept"] = {str(i): ids for i, ids in SELECTORS["mean-prob"](k).fit(cal).experts_.items()}
        for m in todo:
            t0 = time.time()
            kept = SELECTORS[m](k).fit(cal).experts_
            p = _ppls(model, sets, kept)
            d["select"][m] = {"ppl": p, "seconds": round(time.time() - t0, 2)}
            log(f"  {tag} {m}: {ratios(p)}")
            cell.finish(f"select:{m}", time.time() - t0)
    base = {int(i): ids for i, ids in d["kept"].items()}
    params = RepairParams(distill_steps=st["distill_steps"], finetune_steps=st["finetune_steps"], seed=st["seed"])

    def evaluator(prefix: str, kept: dict[int, list[int]], store: dict):
        done: list[str] = []

        def on_step_done(step, tensors):
            done.append(step)
            key = prefix + "+".join(done)
            out = work / f"{twin}-{dom}-{keep}-{key}"
            write_profile(model, out, out.name, kept, overrides=tensors, force=True)
            store[key] = {"ppl": _ppls(load_model(out, dtype="float32"), sets)}
            log(f"  {tag} {key}: {ratios(store[key]['ppl'])}")
        return on_step_done

    def repair(part: str, steps: tuple[str, ...], kept: dict[int, list[int]], prefix: str = "") -> None:
        if cell.done(part):
            return
        t0, store = time.time(), {}
        slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in kept.items()}
        rep = Repairer(steps, params, on_step_done=evaluator(prefix, kept, store)).fit(
            model, slots, ctoks, teacher=model if {"merge", "distill"} & set(steps) else None)
        for n, r in enumerate(rep.record_["steps"]):
            store[prefix + "+".join(steps[: n + 1])].update(_step_cost(r))
        d["repair"].update(store)
        cell.finish(part, time.time() - t0)

    for steps in CHAINS:
        if "+".join(steps) in runs:
            repair("+".join(steps), steps, base)
    if CONTROL in runs and not cell.done(CONTROL) and not cell.borrow_control():
        everything = {i: list(model.layer_experts(i).ids) for i in layout.moe_layers}
        repair(CONTROL, ("finetune",), everything, prefix="full+")
    return d


def geo(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def _ratio(r: dict | None, col: str, s: str) -> float | None:
    if not r or "full" not in r:
        return None
    ent = r["select"].get(col) or r["repair"].get(col)
    return ent["ppl"][s] / r["full"][s] if ent else None


def geo_means(res: dict) -> dict[tuple[str, str], dict[str, dict[str, float | None]]]:
    """{(twin, keep): {split: {column: geometric mean over the domains, None unless all measured}}}."""
    cols = [*res["meta"]["methods"], *COLUMNS, CONTROL]
    out = {}
    for tw, per in res["results"].items():
        for keep, cells in per.items():
            out[(tw, keep)] = {}
            for s in ("thirdparty", "heldout"):
                vals = {c: [_ratio(cells.get(d), c, s) for d in res["meta"]["domains"]] for c in cols}
                out[(tw, keep)][s] = {c: None if None in v else geo(v) for c, v in vals.items()}
    return out


def reading(gm: dict, meta: dict) -> list[str]:
    """The issue's questions answered from the figures (third-party text, geometric means)."""
    lines = ["## Reading the figures\n"]
    repairs = [*COLUMNS]
    for keep in meta["steps"]:
        std, emo = gm.get(("std", keep), {}).get("thirdparty"), gm.get(("emo", keep), {}).get("thirdparty")
        if std and std["mean-prob"] is not None:
            done = {c: std[c] for c in repairs if std.get(c) is not None}
            if done:
                best = min(done, key=done.get)
                share = (done[best] - 1) / (std["mean-prob"] - 1) if std["mean-prob"] > 1 else float("nan")
                lines.append(f"- Standard twin, keep {keep}: mean-prob {std['mean-prob']:.2f}x; best repair {best} "
                             f"{done[best]:.2f}x, its excess over full {share:.0%} of mean-prob's "
                             f"({'within' if done[best] <= 1.3 else 'above'} 1.3x; the goal: at most half); "
                             + (f"the full model fine-tuned alike {std[CONTROL]:.2f}x." if std.get(CONTROL) is not None
                                else "control not run."))
        if emo and std and emo["mean-prob"] is not None:
            same = [c for c in repairs if emo.get(c) is not None]
            worse = [c for c in same if emo[c] > emo["mean-prob"] + 0.005]
            lines.append(f"- EMO twin, keep {keep}: mean-prob {emo['mean-prob']:.2f}x; with the same steps "
                         + ", ".join(f"{c} {emo[c]:.2f}x" for c in same)
                         + (f" (worse than mean-prob: {', '.join(worse)})" if worse else "")
                         + (f"; full model fine-tuned alike {emo[CONTROL]:.2f}x." if emo.get(CONTROL) is not None
                            else "."))
    return lines


def bench_section(path: Path) -> list[str]:
    """The OLMoE-shaped checkpoint's repair cost, from benchmarks/bench_repair.py's --json."""
    if not path.is_file():
        return []
    b = json.loads(path.read_text())
    out = ["## Cost on an OLMoE-shaped 4-layer checkpoint\n",
           f"`benchmarks/bench_repair.py` (its own run, not this one; raw: `{path}`): OLMoE-1B-7B's shapes "
           f"with 4 layers, random bf16 weights, {b['checkpoint_gib']} GiB; keep {b['keep']}, {b['steps']} "
           f"steps of one {b['ctx']}-token sequence, {b['threads']} threads. Whole build {b['build_seconds']:.0f} s, "
           f"peak RSS {b['child_peak_rss_gib']} GiB.\n", "| step | seconds | peak RSS (GiB) | tokens/s |",
           "|---|---|---|---|"]
    out += [f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} | {r['tokens_per_second'] or '-'} |"
            for r in b["repair"]]
    return out + [""]


def markdown(res: dict) -> str:
    meta = res["meta"]
    cols = [*meta["methods"], *COLUMNS, CONTROL]
    doms = meta["domains"]
    out = ["# Selection methods and profile repairs\n",
           f"Generated by `python -m subsetting.repair_report` ({meta['date']}; {meta['cell_seconds']:.0f} s of "
           f"cell work in all, on a CPU shared with other jobs, torch threads 1). Per twin, keep (experts per MoE "
           f"layer, of 32) and domain: the experts of each selection method chosen on {meta['calib_docs']} "
           f"calibration documents of the domain (at most {meta['max_tokens']} tokens each, `{meta['calib']}`); "
           "the repairs start from mean-prob's choice and train on the same documents (4 sequences of 256 "
           "tokens per step; the steps of distill / finetune per keep are in the `steps` column). "
           f"`{CONTROL}` is the control: the full model (all 32 experts) fine-tuned with the same finetune steps "
           "and data, so its ratio is what domain adaptation alone buys; a repaired profile below 1 is read "
           "against it. Perplexity of the written checkpoint (bf16) as a ratio to the full model's, on the "
           "held-out split and on third-party text (`subsetting.auto_rules.thirdparty_docs`). Raw numbers: "
           "`repair.json`; per-cell cache: `" + meta["cells"] + "`." + (f" Run: {meta['note']}." if meta.get("note")
                                                                       else "") + "\n"]
    if meta["not_run"]:
        out.append("Not run (no figures): " + "; ".join(meta["not_run"]) + ".\n")

    def fmt(v):
        return "not run" if v is None else f"{v:.2f}x"

    gm = geo_means(res)
    out += ["## Summary: third-party text, geometric mean over " + ", ".join(doms) + "\n",
            "| twin | keep | steps | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for (tw, keep), v in gm.items():
        st = meta["steps"][keep]
        out.append(f"| {TWINS[tw][0]} | {keep} | {st['distill']}/{st['finetune']} | "
                   + " | ".join(fmt(v["thirdparty"][c]) for c in cols) + " |")
    out += ["", *reading(gm, meta), ""]

    for s, title in (("thirdparty", "Third-party text"), ("heldout", "Held-out split")):
        out += [f"## {title}: perplexity ratio (profile / full)\n",
                "| twin | keep | steps | domain | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
        for tw, per in res["results"].items():
            for keep, cells in per.items():
                st = meta["steps"][keep]
                steps = f"{st['distill']}/{st['finetune']}"
                ratios: dict[str, list] = {c: [] for c in cols}
                for dom in doms:
                    vals = {c: _ratio(cells.get(dom), c, s) for c in cols}
                    for c in cols:
                        ratios[c].append(vals[c])
                    out.append(f"| {TWINS[tw][0]} | {keep} | {steps} | {dom} | "
                               + " | ".join(fmt(vals[c]) for c in cols) + " |")
                out.append(f"| **{TWINS[tw][0]}** | {keep} | {steps} | *geo. mean* | " + " | ".join(
                    "not run" if None in v else f"**{geo(v):.2f}x**" for v in ratios.values()) + " |")
        out.append("")
    out += ["## Cost of each repair step\n",
            "Mean over the domains measured (peak RSS: the largest), in the process that ran the cell.\n",
            "| twin | keep | run | step | steps | seconds | peak RSS (MB) | tokens/s | loss first -> last |",
            "|---|---|---|---|---|---|---|---|---|"]
    for tw, per in res["results"].items():
        for keep, cells in per.items():
            keys = [k for c in (*CHAINS, ("full", "finetune")) for k in ("+".join(c[: n + 1]) for n in range(len(c)))]
            for key in keys:
                ents = [c["repair"][key] for c in cells.values() if key in c.get("repair", {})
                        and "seconds" in c["repair"][key] and "measured_in" not in c["repair"][key]]
                if not ents:
                    continue
                run, step = key.rsplit("+", 1) if "+" in key else ("", key)
                run = f"{run} ->" if run else "(first)"

                def mean(f):
                    v = [e[f] for e in ents if e.get(f) is not None]
                    return sum(v) / len(v) if v else None
                loss = (f"{mean('loss_first'):.3f} -> {mean('loss_last'):.3f}" if mean("loss_first") is not None
                        else f"mean output similarity {mean('mean_similarity'):.3f}")
                tps = mean("tokens_per_second")
                out.append(f"| {TWINS[tw][0]} | {keep} | {run} | {step} | {ents[0].get('steps', '-')} | "
                           f"{mean('seconds'):.1f} | {max(e['peak_rss_bytes'] for e in ents) / 1e6:.0f} | "
                           f"{'-' if tps is None else f'{tps:.0f}'} | {loss} |")
    out += ["", *bench_section(Path(meta["bench"]))] if meta.get("bench") else []
    return "\n".join(out) + "\n"


def assemble(a) -> dict:
    """The report's json from the cell files (no measuring)."""
    res = {"meta": {"date": time.strftime("%Y-%m-%d"), "cells": str(a.cells), "note": a.note, "bench": a.bench,
                    "methods": list(a.methods), "domains": a.domains.split(","), "cell_seconds": 0.0,
                    "steps": {}, "not_run": [], **{k: getattr(a, k) for k in ("calib", "heldout", "calib_docs",
                                                                              "max_tokens")}},
           "results": {}}
    parts = ["full", *(f"select:{m}" for m in a.methods), *RUNS]
    for tw in a.twins.split(","):
        for keep in map(int, a.keep.split(",")):
            st = cell_settings(a, keep)
            res["meta"]["steps"][str(keep)] = {"distill": st["distill_steps"], "finetune": st["finetune_steps"]}
            missing = {}
            for dom in a.domains.split(","):
                c = Cell(a.cells, tw, keep, dom, st)
                m = [p for p in parts if not c.done(p)]
                missing[dom] = "all" if len(m) == len(parts) else ", ".join(m)
                if c.data["done"]:
                    res["results"].setdefault(tw, {}).setdefault(str(keep), {})[dom] = c.data
                    res["meta"]["cell_seconds"] += c.data["seconds"]
            same = set(missing.values())
            if len(missing) > 1 and same == {next(iter(same))}:
                missing = {"every domain": next(iter(same))}
            res["meta"]["not_run"] += [f"{TWINS[tw][0]} keep {keep} {dom}: {m}" for dom, m in missing.items() if m]
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--twins", default="std,emo")
    ap.add_argument("--keep", default="8,4,16", help="experts per MoE layer, in the order the cells are run")
    ap.add_argument("--domains", default="python,c,prose")
    ap.add_argument("--methods", default=",".join(SELECT), help=f"selection methods ({', '.join(SELECTORS)})")
    ap.add_argument("--runs", default=",".join(RUNS), help="the repair runs to measure (and the control)")
    ap.add_argument("--calib", default="runs/corpus/train.jsonl")
    ap.add_argument("--heldout", default="training/data/heldout.jsonl")
    ap.add_argument("--calib-docs", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--distill-steps", type=per_keep, default=20, help="N, or steps per keep: 8:40,4:20,16:20")
    ap.add_argument("--finetune-steps", type=per_keep, default=20)
    ap.add_argument("--cells", type=Path, default=Path("runs/repair-report"), help="the per-cell cache")
    ap.add_argument("--json", default="reports/subset/repair.json")
    ap.add_argument("--md", default="reports/subset/repair.md")
    ap.add_argument("--bench", default="reports/subset/bench_repair.json",
                    help="benchmarks/bench_repair.py's --json, quoted in the report when it exists")
    ap.add_argument("--note", default="", help="a line about the run for the report's header")
    ap.add_argument("--render", action="store_true", help="only assemble --json and --md from the cells")
    a = ap.parse_args(argv)
    a.methods = tuple(m for m in a.methods.split(",") if m)
    a.runs = tuple(r for r in a.runs.split(",") if r)
    if set(a.runs) - set(RUNS):
        ap.error(f"--runs: unknown {sorted(set(a.runs) - set(RUNS))}; choose from {', '.join(RUNS)}")
    bad = [m for m in a.methods if m not in SELECTORS]
    if bad or "mean-prob" not in a.methods:
        ap.error(f"--methods: unknown {bad}" if bad else "--methods must include mean-prob (the repairs start from it)")
    if not a.render:
        if not Path(a.calib).exists():
            ap.error(f"{a.calib} is missing: build it with `python -m training.corpus --out runs/corpus`")
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="repair-report-") as work:
            for keep in map(int, a.keep.split(",")):
                for tw in a.twins.split(","):
                    for dom in a.domains.split(","):
                        run_cell(Cell(a.cells, tw, keep, dom, cell_settings(a, keep)), tw, dom, keep, a.methods,
                                 a.runs, Path(work))
    res = assemble(a)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1))
    Path(a.md).write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
