"""`emo-subset`: fingerprint routing, discover domains, build, evaluate, inspect and verify profiles."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from modeling import CheckpointError, ConfigError, ModelNotFound, PoolError, ProfileError, ProfileManifest, load_model
from modeling.io.gguf_export import ExportError
from modeling.quant import PRESETS, WeightScheme, preset
from modeling.quant.quantize import check_config
from modeling.io.safetensors_io import CheckpointFiles
from modeling.tokenizer import TokenizerError

from .corpus import read_corpus, sample, small_calibration, tokenize
from .discover import DomainDiscovery, summary_markdown
from .errors import SubsetError
from .fingerprint import Fingerprinter, Fingerprints, Layout
from .select import SELECTORS, Calibration, coverage, parse_keep, read_experts_file
from .stability import resample_stability
from .writer import verification_report, write_profile

PROG = "emo-subset"


def _say(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _warn(args, warnings: list[str]) -> None:
    """Warnings to stderr (--quiet silences them; --json summaries carry them as "warnings")."""
    for w in warnings:
        _say(args, f"{PROG}: warning: {w}")


def _emit(args, summary: dict[str, Any], text: str | None = None) -> None:
    if args.json:
        print(json.dumps(summary, indent=1, default=_json_default))
    elif text is not None:
        print(text)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _load(args, path: str):
    _say(args, f"loading {path}")
    return load_model(path, dtype=getattr(args, "dtype", None))


# -- fingerprint ---------------------------------------------------------------


def cmd_fingerprint(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    docs = sample(read_corpus(args.corpus, args.domain), args.max_docs)
    model = _load(args, args.model)
    t0 = time.time()
    fper = Fingerprinter(model, args.max_tokens, args.max_batch_tokens, progress=not args.quiet).fit(docs)
    fp = fper.fingerprints_
    path = fp.save(out)
    warnings = small_calibration(fp.labels, fp.tokens.tolist())
    _warn(args, warnings)
    summ = {"fingerprints": str(path), **fp.calibration(), "layers": fp.layout.moe_layers,
            "experts": fp.layout.num_original, "seconds": round(time.time() - t0, 3), "warnings": warnings}
    _emit(args, summ, f"wrote {path}: {summ['documents']} documents, {summ['tokens']} tokens")
    return 0


# -- discover ------------------------------------------------------------------


def clusters_path(fp_path: str | Path) -> Path:
    p = Path(fp_path)
    stem = p.name[:-4] if p.name.endswith(".npz") else p.name
    return p.with_name(stem + ".clusters.json")


def cmd_discover(args) -> int:
    fp = Fingerprints.load(args.fingerprints)
    k: int | str = args.k
    if k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise SubsetError(f"--k {args.k!r}: expected an integer or 'auto'") from None
    dd = DomainDiscovery(k, n_components=args.components, seed=args.seed).fit(fp)
    summ = dd.summary(fp)
    out = Path(args.out) if args.out else clusters_path(args.fingerprints)
    out.write_text(json.dumps(summ, indent=1))
    md = out.with_suffix(".md")
    md.write_text(summary_markdown(summ))
    summ = {**summ, "clusters_file": str(out), "summary_file": str(md)}
    _emit(args, summ, summary_markdown(summ))
    return 0


# -- build ---------------------------------------------------------------------


def _calibration(args, model) -> tuple[Fingerprints | None, list[list[int]] | None, dict]:
    """Fingerprints of the calibration documents on `model`, their token ids, and where they came from."""
    if args.corpus and args.fingerprints:
        raise SubsetError("give either --corpus or --fingerprints, not both")
    if args.corpus:
        docs = sample(read_corpus(args.corpus, args.domain), args.max_docs)
        docs, toks = tokenize(docs, model.tokenizer, min(args.max_tokens, model.config.max_position_embeddings))
        fp = Fingerprinter(model, args.max_tokens, args.max_batch_tokens, progress=not args.quiet).fit(docs, toks).fingerprints_
        return fp, toks, {"corpus": [str(c) for c in args.corpus], "domain": args.domain, "max_docs": args.max_docs}
    if args.fingerprints:
        fp = Fingerprints.load(args.fingerprints)
        want = model.identity.get("id")
        if fp.model.get("identity", {}).get("id") != want:
            raise SubsetError(f"{args.fingerprints}: fingerprints were taken on another model "
                              f"({fp.model.get('path')}); re-run `emo-subset fingerprint` on {args.model}")
        if fp.layout.loaded != Layout.of(model).loaded:
            raise SubsetError(f"{args.fingerprints}: fingerprints were taken on a model with other experts loaded")
        source: dict[str, Any] = {"fingerprints": str(args.fingerprints)}
        if args.exclude_cluster is not None:
            # every document stays; its domain becomes its cluster, so "exclude cluster N" is "exclude domain"
            labels = _cluster_labels(args, fp)
            if not (labels == args.exclude_cluster).any():
                raise SubsetError(f"cluster {args.exclude_cluster} has no documents (clusters 0..{labels.max()})")
            fp.labels = [f"cluster {c}" for c in labels]
            source["exclude_cluster"] = args.exclude_cluster
        if args.cluster is not None:
            labels = _cluster_labels(args, fp)
            idx = np.flatnonzero(labels == args.cluster)
            if not len(idx):
                raise SubsetError(f"cluster {args.cluster} has no documents (clusters 0..{labels.max()})")
            source["cluster"] = args.cluster
        elif args.domain is not None:
            idx = [i for i, lab in enumerate(fp.labels) if lab == args.domain]
            if not idx:
                raise SubsetError(f"{args.fingerprints}: no documents of domain {args.domain!r}")
            source["domain"] = args.domain
        else:
            idx = np.arange(len(fp))
        fp = fp.subset(idx)
        toks = None
        if args.method in SELECTORS and "token_lists" in SELECTORS[args.method].needs or getattr(args, "repair", None):
            limit = min(args.max_tokens, model.config.max_position_embeddings)
            toks = [model.tokenizer.encode(t)[:limit] for t in fp.texts]
        return fp, toks, source
    return None, None, {}


def _cluster_labels(args, fp: Fingerprints) -> np.ndarray:
    cf = Path(args.clusters) if args.clusters else clusters_path(args.fingerprints)
    try:
        labels = np.array(json.loads(cf.read_text())["labels"])
    except FileNotFoundError:
        raise SubsetError(f"{cf}: no clusters file (run `emo-subset discover` first)") from None
    except (KeyError, ValueError) as e:
        raise SubsetError(f"{cf}: not a clusters file ({e})") from None
    if len(labels) != len(fp):
        raise SubsetError(f"{cf}: {len(labels)} labels for {len(fp)} fingerprinted documents")
    return labels


def _exclusion(args) -> str | None:
    """The domain an exclusion profile leaves out (`--exclude-domain` / `--exclude-cluster`), checked."""
    if args.exclude_domain is None and args.exclude_cluster is None:
        return None
    if args.exclude_domain is not None and args.exclude_cluster is not None:
        raise SubsetError("give either --exclude-domain or --exclude-cluster, not both")
    if args.domain is not None or args.cluster is not None:
        raise SubsetError("an exclusion profile calibrates on every domain: drop --domain / --cluster")
    if args.method not in ("mean-prob", "exclude-domain"):
        raise SubsetError(f"--exclude-domain / --exclude-cluster choose by --method exclude-domain, not {args.method}")
    if args.exclude_cluster is not None and not args.fingerprints:
        raise SubsetError("--exclude-cluster needs --fingerprints (clustered by `emo-subset discover`)")
    args.method = "exclude-domain"
    return args.exclude_domain if args.exclude_domain is not None else f"cluster {args.exclude_cluster}"
def _scheme(args) -> WeightScheme | None:
    if args.quantize is None:
        if args.group_size is not None or args.quantize_lm_head:
            raise SubsetError("--group-size and --quantize-lm-head need --quantize")
        return None
    return preset(args.quantize, args.group_size)


def cmd_quantize(args) -> int:
    from modeling.quant.writer import quantize_checkpoint

    scheme = _scheme(args)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    from modeling import resolve_checkpoint

    src = resolve_checkpoint(args.model)
    total = CheckpointFiles(src).total_bytes()
    _say(args, f"quantizing {src} ({scheme.describe()}) to {out}")
    with tqdm(total=total, desc=f"quantize {src.name}", unit="B", unit_scale=True, disable=args.quiet,
              leave=False) as bar:
        summ = quantize_checkpoint(src, out, scheme, lm_head=args.quantize_lm_head,
                                   max_shard_bytes=args.max_shard_bytes, force=args.force, on_progress=bar.update)
    _emit(args, summ, f"wrote {out}: {summ['quantized']} matrices quantized ({summ['scheme']}), "
                      f"{summ['bytes_in'] / 1e6:.1f} MB -> {summ['bytes'] / 1e6:.1f} MB")
    return 0


def cmd_build(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    if args.budget is not None:
        if args.experts_file is not None:
            raise SubsetError("give either --budget or --experts-file, not both")
        if args.method == "random" or args.exclude_domain is not None or args.exclude_cluster is not None:
            raise SubsetError("--budget spends experts by score: use it with a scoring method, not random or "
                              "an exclusion profile")
    elif args.experts_file is None and args.keep is None:
        raise SubsetError("give --keep N (with calibration text) or --experts-file F")
    if args.experts_file is not None and args.keep is not None:
        raise SubsetError("give either --keep or --experts-file, not both")
    if args.method not in SELECTORS:
        raise SubsetError(f"--method {args.method!r}: choose one of {', '.join(SELECTORS)}")
    exclude = _exclusion(args)
    if args.method == "exclude-domain" and exclude is None:
        raise SubsetError("--method exclude-domain needs --exclude-domain X or --exclude-cluster N")
    scheme = _scheme(args)
    steps = _repair_steps(args)
    t0 = time.time()
    if steps and args.dtype is None:
        args.dtype = "float32"  # repair trains in float32 and checks itself against the model's forward
    model = _load(args, args.model)
    if scheme is not None:
        check_config(model.config, scheme)  # before any calibration work
    layout = Layout.of(model)
    if not layout.moe_layers:
        raise SubsetError(f"{args.model}: the model has no mixture-of-experts layer")
    name = args.name or out.name
    stab = None
    if args.experts_file is not None:
        kept = read_experts_file(args.experts_file, layout)
        fp, toks, source = _calibration(args, model)
        selection = {"method": "experts-file", "params": {"file": str(args.experts_file)}}
    else:
        keep = parse_keep(args.keep if args.keep is not None else layout.top_k, layout)
        fp, toks, source = _calibration(args, model)
        sel = SELECTORS[args.method](keep, seed=args.seed)
        sel.budget = args.budget  # None, or N experts over all layers with `keep` the minimum per layer
        if exclude is not None:
            sel.exclude = exclude
        cal = Calibration(layout, fp, toks, model, args.max_batch_tokens, progress=not args.quiet)
        kept = sel.fit(cal).experts_
        params: dict[str, Any] = {**sel.params(), **source}
        if fp is not None:
            params["max_tokens"] = args.max_tokens
        selection = {"method": args.method, "params": params}
        stab = resample_stability(sel, cal, args.stability, args.seed) if args.stability else None
        if stab is not None:
            selection["stability"] = stab.to_dict()
    cov, calib, cent = {}, {}, None
    warnings: list[str] = []
    if fp is not None:
        label = args.domain if args.domain is not None else (
            f"cluster {args.cluster}" if args.cluster is not None else "calibration")
        warnings += [w.replace("domain ", "", 1) if label.startswith(("cluster", "calibration")) else w
                     for w in small_calibration([label] * len(fp), fp.tokens.tolist())]
        if stab is not None and stab.warning():
            warnings.append(stab.warning())
        _warn(args, warnings)
        cov = coverage(fp.token_mean(), layout, kept)
        calib = {**fp.calibration(), **({"source": source} if source else {})}
        cent = fp.centroid()
    t_sel = time.time() - t0
    overrides, repair = None, None
    if steps:
        if toks is None:
            raise SubsetError("--repair needs calibration text: --corpus FILES or --fingerprints FP")
        slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in kept.items()}
        overrides, repair = _run_repair(args, steps, model, slots, toks, model, source)
    man = write_profile(model, out, name, kept, selection=selection, calibration=calib, coverage=cov, centroid=cent,
                        max_shard_bytes=args.max_shard_bytes, force=args.force, progress=not args.quiet,
                        save_dtype=args.save_dtype, quantize=scheme, quantize_lm_head=args.quantize_lm_head,
                        overrides=overrides, repair=repair)
    summ = {"profile": str(out), "name": man.name, "method": selection["method"],
            "kept_per_layer": {str(i): len(v) for i, v in man.kept_experts.items()},
            "coverage": {str(i): c for i, c in man.coverage.items()}, "bytes": man.bytes, "shards": man.shards,
            "calibration": man.calibration, "seconds": round(time.time() - t0, 3),
            "seconds_selection": round(t_sel, 3), "warnings": warnings, "repair": man.repair or None}
    cov_txt = f", mean coverage {np.mean(list(cov.values())):.3f}" if cov else ""
    _emit(args, summ, f"wrote {out}: {sum(len(v) for v in kept.values())} experts in {len(kept)} layers, "
                      f"{man.bytes['total'] / 1e6:.1f} MB in {len(man.shards)} shard(s){cov_txt}")
    return 0


# -- repair ----------------------------------------------------------------------


def _repair_steps(args) -> tuple[str, ...]:
    from training.repair import parse_steps

    if not getattr(args, "repair", None):
        return ()
    steps = parse_steps(args.repair)
    if args.finetune_tokens is not None:
        if args.finetune_tokens < 1:
            raise SubsetError("--finetune-tokens must be at least 1")
        args.finetune_steps = max(1, -(-args.finetune_tokens // (args.repair_batch * args.repair_ctx)))
    for opt in ("distill_steps", "finetune_steps", "merge_tokens", "repair_batch", "repair_ctx"):
        if getattr(args, opt) < 1:
            raise SubsetError(f"--{opt.replace('_', '-')} must be at least 1")
    for opt in ("distill_lr", "finetune_lr"):
        if not getattr(args, opt) > 0:
            raise SubsetError(f"--{opt.replace('_', '-')} must be positive")
    if getattr(args, "quantize", None) is not None:
        raise SubsetError("--repair writes float experts: quantize the repaired profile afterwards "
                          "(`emo-subset quantize`)")
    return steps


def _run_repair(args, steps, student, slots, toks, teacher, source: dict) -> tuple[dict, dict]:
    """Run `training.repair` and return (tensors to write, the record for profile.json)."""
    from training.repair import Repairer, RepairParams

    params = RepairParams(merge_tokens=args.merge_tokens, distill_steps=args.distill_steps,
                          distill_lr=args.distill_lr, finetune_steps=args.finetune_steps,
                          finetune_lr=args.finetune_lr, batch=args.repair_batch, ctx=args.repair_ctx, seed=args.seed)
    bars: dict[str, tqdm] = {}

    def progress(step, i, n, loss, tps):
        if args.quiet:
            return
        bar = bars.get(step)
        if bar is None:
            bar = bars[step] = tqdm(total=n, desc=step, unit="step", leave=False)
        bar.set_postfix_str(f"loss {loss:.4f}, {tps:,.0f} tok/s", refresh=False)
        bar.update(1)
        if i == n:
            bar.close()
            _say(args, f"{step}: {n} steps, last loss {loss:.4f}, {tps:,.0f} tokens/s")

    _say(args, f"repair: {', '.join(steps)}")
    rep = Repairer(steps, params, on_progress=progress).fit(student, slots, toks, teacher, data=source)
    for r in rep.record_["steps"]:
        if r["step"] == "merge":
            _say(args, f"merge: {sum(len(v) for f in r['folded'].values() for v in f.values())} dropped experts "
                       f"folded in {r['seconds']} s")
    record = {**rep.record_, "params": rep.params_dict()}
    return rep.tensors_, record


def cmd_repair(args) -> int:
    """Repair an existing profile: its kept experts, routers and (for merge / distill) the base it came from."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    steps = _repair_steps(args)
    if not steps:
        raise SubsetError("give --repair STEPS (merge, distill, finetune)")
    if args.dtype is None:
        args.dtype = "float32"  # repair trains in float32 and checks itself against the model's forward
    man = ProfileManifest.read(args.profile)
    docs = sample(read_corpus(args.corpus, args.domain), args.max_docs)
    teacher = None
    if "merge" in steps or "distill" in steps:
        if args.base is None:
            raise SubsetError(f"--repair {args.repair}: merge and distill need the base {args.profile} was cut from "
                              f"({man.base.get('name')!r}, id {man.base.get('id')}): give --base MODEL")
    if args.base is not None:
        teacher = _load(args, args.base)
        if teacher.identity.get("id") != man.base.get("id"):
            raise SubsetError(f"{args.profile}: cut from base {man.base.get('name')!r} (id {man.base.get('id')}), "
                              f"not from {args.base} (id {teacher.identity.get('id')})")
        if (Path(args.base) / "profile.json").is_file():
            raise SubsetError(f"--base {args.base} is a profile; give the full model the profile was cut from")
    student = _load(args, args.profile)
    t0 = time.time()
    docs, toks = tokenize(docs, student.tokenizer, min(args.max_tokens, student.config.max_position_embeddings))
    slots = {i: list(range(len(ids))) for i, ids in man.kept_experts.items()}
    source = {"corpus": [str(c) for c in args.corpus], "domain": args.domain, "max_docs": args.max_docs}
    overrides, record = _run_repair(args, steps, student, slots, toks, teacher, source)
    if man.repair:  # repaired before: this pass comes after the earlier ones
        record["earlier"] = man.repair
    centroid = None if man.centroid is None else np.array(man.centroid, dtype=np.float32) if \
        len({len(r) for r in man.centroid}) == 1 else None
    new = write_profile(student, out, args.name or out.name, man.pool(), selection=man.selection,
                        calibration=man.calibration, coverage=man.coverage, centroid=centroid,
                        max_shard_bytes=args.max_shard_bytes, force=args.force, progress=not args.quiet,
                        overrides=overrides, repair=record)
    summ = {"profile": str(out), "name": new.name, "from": str(args.profile), "repair": new.repair,
            "seconds": round(time.time() - t0, 3)}
    _emit(args, summ, f"wrote {out}: {', '.join(steps)} on {record['data']['tokens']} tokens, "
                      f"{new.bytes['total'] / 1e6:.1f} MB")
    return 0


# -- eval, inspect, verify ---------------------------------------------------------


def _base_of(profile: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    cand = profile.resolve().parent.parent
    if profile.resolve().parent.name == "profiles" and (cand / "config.json").is_file():
        return str(cand)
    raise SubsetError(f"{profile}: give --base MODEL (the full model it was cut from)")


def cmd_eval(args) -> int:
    from .evaluate import retention_rows

    docs = read_corpus(args.text)
    base_path = _base_of(Path(args.profiles[0]), args.base)
    full = _load(args, base_path)
    by_dom: dict[str, list] = {}
    for d in docs:
        by_dom.setdefault(d.domain or "all", []).append(d)
    toks_by_dom = {}
    for dom, ds in sorted(by_dom.items()):
        _, toks = tokenize(ds, full.tokenizer, min(args.max_tokens, full.config.max_position_embeddings))
        toks_by_dom[dom] = toks
    profiles, excluded = [], {}
    for p in args.profiles:
        man = ProfileManifest.read(p)
        if man.selection.get("method") == "exclude-domain":
            excluded[man.name] = man.selection.get("params", {}).get("exclude")
        if man.base.get("id") != full.identity.get("id"):
            raise SubsetError(f"{p}: cut from base {man.base.get('name')!r}, not from {base_path}")
        profiles.append((man.name, load_model(p, dtype=args.dtype), man.pool()))
    rows = retention_rows(full, profiles, toks_by_dom, seeds=args.random_seeds, progress=not args.quiet)
    lines = ["| profile | domain | experts | ppl profile | ppl full | ppl random | retention | random retention |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['profile']} | {r['domain']} | {r['experts']} | {r['ppl_profile']:.3f} | {r['ppl_full']:.3f} "
                     f"| {r['ppl_random']:.3f} | {r['retention']:.3f} | {r['retention_random']:.3f} |")
    summary = exclusion_summary(rows, excluded)
    if summary:
        lines += ["", "Exclusion profiles: perplexity rise (profile / full - 1) of the excluded domain against the "
                      "kept domains'", "",
                  "| profile | excluded | its rise | worst kept domain | its rise | excluded / worst kept |",
                  "|---|---|---|---|---|---|"]
        for e in summary:
            lines.append(f"| {e['profile']} | {e['excluded']} | {100 * e['rise_excluded']:+.1f}% | {e['worst_kept']} "
                         f"| {100 * e['rise_worst_kept']:+.1f}% | {e['ratio']:.1f}x |")
    _emit(args, {"base": base_path, "rows": rows, "exclusion": summary}, "\n".join(lines))
    return 0


def exclusion_summary(rows: list[dict], excluded: dict[str, str | None]) -> list[dict]:
    """Per exclusion profile: how much the excluded domain's perplexity rises against
    the kept domains' (a rise is profile / full - 1; the ratio is the excluded one's
    over the largest kept one's)."""
    out = []
    for name, dom in excluded.items():
        mine = {r["domain"]: r["ppl_profile"] / r["ppl_full"] - 1 for r in rows if r["profile"] == name}
        if dom not in mine or len(mine) < 2:
            continue
        kept = {d: v for d, v in mine.items() if d != dom}
        worst = max(kept, key=kept.get)
        out.append({"profile": name, "excluded": dom, "rise_excluded": mine[dom], "worst_kept": worst,
                    "rise_worst_kept": kept[worst], "rises": mine,
                    "ratio": mine[dom] / kept[worst] if kept[worst] > 0 else float("inf")})
    return out


def cmd_inspect(args) -> int:
    man = ProfileManifest.read(args.profile)
    d = man.to_dict()
    if not args.centroid:
        d.pop("centroid", None)
    text = [f"profile {man.name} ({args.profile})",
            f"  base: {man.base.get('name')} id {man.base.get('id')}",
            f"  selection: {man.selection.get('method')} {json.dumps(man.selection.get('params', {}))[:200]}",
            f"  calibration: {man.calibration.get('documents', '-')} documents, {man.calibration.get('tokens', '-')} tokens, "
            f"domains {man.calibration.get('domains', [])}",
            f"  bytes: {man.bytes}", f"  shards: {len(man.shards)}"]
    for i, ids in sorted(man.kept_experts.items()):
        cov = man.coverage.get(i)
        text.append(f"  layer {i}: {len(ids)}/{man.num_experts_original[i]} experts"
                    + (f", coverage {cov:.3f}" if cov is not None else "") + f": {ids}")
    _emit(args, d, "\n".join(text))
    return 0


def cmd_verify(args) -> int:
    results = [verification_report(p, progress=not args.quiet) for p in args.profiles]
    ok = all(r["ok"] for r in results)
    lines = []
    for r in results:
        lines.append(f"{r['profile']}: {'OK' if r['ok'] else 'FAILED'} ({len(r['shards'])} shards)")
        lines += [f"  {p}" for p in r["problems"]]
    _emit(args, {"ok": ok, "profiles": results}, "\n".join(lines))
    if not ok:
        for r in results:
            for p in r["problems"]:
                print(f"{PROG}: {r['profile']}: {p}", file=sys.stderr)
    return 0 if ok else 1


# -- export-gguf -------------------------------------------------------------------


def cmd_export_gguf(args) -> int:
    from modeling.io.gguf_export import export_gguf  # imports the gguf package only when asked

    _say(args, f"exporting {args.profile} to {args.out}")
    summ = export_gguf(args.profile, args.out, name=args.name, tokenizer_pre=args.tokenizer_pre, force=args.force)
    _emit(args, summ, f"wrote {summ['gguf']}: {summ['architecture']}, {summ['tensors']} tensors, "
                      f"{summ['expert_count']} experts (top-{summ['expert_used_count']}), {summ['bytes'] / 1e6:.1f} MB")
    return 0


# -- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary to stdout (default: a readable "
                        "summary)")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages on stderr "
                        "(default: show them)")
    common.add_argument("--dtype", default=None, help="compute dtype: bfloat16, float16 or float32 (default: the "
                        "checkpoint's own, no copy)")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 epilog="Documentation: docs/architecture.md and docs/profiles.md in the repository.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def quant_opts(p, required: bool = False):
        p.add_argument("--quantize", choices=tuple(PRESETS), default=None, required=required,
                       help="store linear weights quantized (compressed-tensors): int8 per output channel, int4 in "
                            "groups of 128 inputs, symmetric or (int4-zp) with zero points; router, norms and "
                            "embeddings keep their dtype" + ("" if required else " (default: not quantized)"))
        p.add_argument("--group-size", type=int, default=None, help="int4 group size along the input (default 128)")
        p.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: lm_head keeps its dtype)")

    def repair_opts(p, required: bool = False):
        p.add_argument("--repair", default=None, required=required, metavar="STEPS",
                       help="repair the kept experts, in this order: merge (fold dropped experts into the most "
                            "similar kept one), distill (train the kept router rows on KL to the full model), "
                            "finetune (next-token training of kept experts and router rows on the text); "
                            "comma-separated" + ("" if required else " (default: none)"))
        p.add_argument("--merge-tokens", type=int, default=4096, help="calibration tokens whose expert outputs "
                       "decide the merge (default %(default)s)")
        p.add_argument("--distill-steps", type=int, default=100, help="distillation steps (default %(default)s)")
        p.add_argument("--distill-lr", type=float, default=3e-3, help="distillation learning rate "
                       "(default %(default)s)")
        p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps (default %(default)s)")
        p.add_argument("--finetune-tokens", type=int, default=None, help="fine-tune for about this many tokens "
                       "instead of --finetune-steps (default: none)")
        p.add_argument("--finetune-lr", type=float, default=2e-4, help="fine-tuning learning rate "
                       "(default %(default)s)")
        p.add_argument("--repair-batch", type=int, default=4, help="sequences per training step "
                       "(default %(default)s)")
        p.add_argument("--repair-ctx", type=int, default=256, help="tokens per training sequence, at most the "
                       "model's context (default %(default)s)")

    def model_opts(p):
        p.add_argument("--max-tokens", type=int, default=512, help="tokens per document; longer ones are "
                       "truncated (default %(default)s)")
        p.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens run together per layer step: "
                       "bounds the memory of the hidden states (default %(default)s)")
        p.add_argument("--max-docs", type=int, default=None, help="at most this many calibration documents in all, "
                       "split evenly between the domains (a domain with fewer gives its share to the others) and "
                       "evenly spaced within each (default: every document)")

    p = sub.add_parser("fingerprint", parents=[common], help="per-document routing fingerprints",
                       description="Run a model over calibration text and record, per document, the router's "
                                   "mean probability per layer and expert (an .npz file).")
    p.add_argument("model", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("corpus", nargs="+", help=".jsonl (text, domain) / .txt files or folders")
    p.add_argument("--out", required=True, help="fingerprint file to write (.npz)")
    p.add_argument("--domain", default=None, help="only this domain; also the label of unlabelled text "
                   "(default: every domain)")
    p.add_argument("--force", action="store_true", help="replace an existing file (default: refuse)")
    model_opts(p)
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("discover", parents=[common], help="cluster fingerprints into domains",
                       description="Find the domains of an unlabelled corpus: PCA of the fingerprints, L2 "
                                   "normalisation, spherical k-means.")
    p.add_argument("fingerprints", help="fingerprint file from `emo-subset fingerprint`")
    p.add_argument("--k", default="auto", help="number of clusters, or 'auto' to choose it by silhouette "
                   "(default %(default)s)")
    p.add_argument("--components", type=int, default=32, help="PCA components (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means' initialisation (default %(default)s)")
    p.add_argument("--out", default=None, help="clusters JSON to write, with a .md summary beside it "
                   "(default: FP.clusters.json beside the fingerprints)")
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("build", parents=[common], help="write a pruned profile",
                       description="Choose the experts a domain keeps and write them as a standalone checkpoint "
                                   "with profile.json (docs/profiles.md).")
    p.add_argument("model", help="checkpoint folder (or profile) or Hugging Face repo id")
    p.add_argument("--out", required=True, help="profile folder to write")
    p.add_argument("--name", default=None, help="profile name (default: the folder's name)")
    p.add_argument("--corpus", nargs="+", default=None, help="calibration .jsonl / .txt files or folders "
                   "(default: none; give this or --fingerprints unless --method random or --experts-file)")
    p.add_argument("--domain", default=None, help="calibrate on this domain of the corpus / fingerprints "
                   "(default: every document)")
    p.add_argument("--fingerprints", default=None, help="fingerprint file from `emo-subset fingerprint` "
                   "(default: none)")
    p.add_argument("--cluster", type=int, default=None, help="calibrate on this cluster of `emo-subset discover` "
                   "(default: none)")
    p.add_argument("--clusters", default=None, help="clusters file (default: FP.clusters.json)")
    p.add_argument("--keep", default=None, help="experts kept per layer, shared included: N, N%% or a schedule "
                   "a,b,c (default: none; give this or --experts-file)")
    p.add_argument("--budget", type=int, default=None, metavar="N",
                   help="spend N experts over all MoE layers (shared included), allocated by the method's scores "
                        "(normalised per layer); --keep is then the minimum per layer (default: top-k). Such a "
                        "profile keeps different counts per layer: emo-serve loads it, GGUF export and stock "
                        "transformers do not (default: none)")
    p.add_argument("--experts-file", default=None, help="JSON {layer: [original expert ids]} to keep "
                   "(default: none; give this or --keep)")
    p.add_argument("--method", default="mean-prob", help=f"selection method, one of {', '.join(SELECTORS)} "
                   "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random and of the stability resamples "
                   "(default %(default)s)")
    p.add_argument("--exclude-domain", default=None, metavar="X",
                   help="an exclusion profile: keep every expert but those most specific to domain X (calibration "
                        "on every domain; --keep bounds the count; --method exclude-domain) (default: none)")
    p.add_argument("--exclude-cluster", type=int, default=None, metavar="N",
                   help="the same with cluster N of `emo-subset discover` (needs --fingerprints) (default: none)")
    p.add_argument("--stability", type=int, default=8, metavar="N",
                   help="refit the selection on N bootstrap resamples of the calibration documents and record how "
                        "many kept experts change; warns when unstable; 0 skips; fingerprint-only methods "
                        "(default %(default)s)")
    p.add_argument("--max-shard-bytes", type=int, default=2 * 1000**3, help="largest shard file "
                   "(default %(default)s)")
    p.add_argument("--save-dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="store the profile's weights in this dtype (default: the base's), converted tensor by "
                        "tensor as the shards are written")
    p.add_argument("--force", action="store_true", help="replace an existing profile (default: refuse)")
    quant_opts(p)
    model_opts(p)
    repair_opts(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("repair", parents=[common], help="repair a profile: merge dropped experts, distill its "
                       "router, fine-tune its experts",
                       description="Write a repaired copy of a profile (new expert bytes; profile.json records the "
                                   "steps, data and hyperparameters). merge and distill need the full base model.")
    p.add_argument("profile", help="profile folder to repair")
    p.add_argument("--corpus", nargs="+", required=True, help="the domain's text: .jsonl / .txt files or folders")
    p.add_argument("--domain", default=None, help="only this domain of the corpus (default: every document)")
    p.add_argument("--base", default=None, help="the full model the profile was cut from (needed by merge and "
                   "distill; default: none)")
    p.add_argument("--out", required=True, help="repaired profile folder to write")
    p.add_argument("--name", default=None, help="profile name (default: the folder's name)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and sampling (default %(default)s)")
    p.add_argument("--max-shard-bytes", type=int, default=2 * 1000**3, help="largest shard file "
                   "(default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing folder (default: refuse)")
    model_opts(p)
    repair_opts(p, required=True)
    p.set_defaults(func=cmd_repair, quantize=None)

    p = sub.add_parser("quantize", parents=[common], help="write a whole checkpoint (or profile) with quantized "
                       "linear weights (compressed-tensors pack-quantized)")
    p.add_argument("model", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--max-shard-bytes", type=int, default=2 * 1000**3,
                   help="largest shard file to write, in bytes (default 2000000000)")
    p.add_argument("--force", action="store_true", help="replace an existing folder (default: refuse)")
    quant_opts(p, required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", parents=[common], help="held-out perplexity: profile vs full vs random",
                       description="Perplexity of each profile on held-out text, against the full model and random "
                                   "subsets of the same size, per domain.")
    p.add_argument("profiles", nargs="+", help="profile folders (of one base)")
    p.add_argument("--text", nargs="+", required=True, help="held-out .jsonl / .txt (domain labels split the table)")
    p.add_argument("--base", default=None, help="the full model (default: the folder holding profiles/)")
    p.add_argument("--random-seeds", type=int, default=1, help="random subsets averaged per row "
                   "(default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per document; longer ones are truncated "
                   "(default %(default)s)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", parents=[common], help="show a profile's manifest")
    p.add_argument("profile", help="profile folder")
    p.add_argument("--centroid", action="store_true", help="include the centroid in --json (default: left out)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export-gguf", parents=[common], help="write a profile (or checkpoint) as one GGUF file "
                       "for llama.cpp / ollama (olmoe, qwen3_moe, mixtral, glm4_moe)")
    p.add_argument("profile", help="profile or checkpoint folder (the same expert count in every MoE layer)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--name", default=None, help="general.name in the file (default: the folder's name)")
    p.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name (default: the family's)")
    p.add_argument("--force", action="store_true", help="replace an existing file (default: refuse)")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("verify", parents=[common], help="check a profile's files against profile.json",
                       description="Check the manifest's own hash and every file's sha256 against profile.json; "
                                   "exit 1 naming each problem.")
    p.add_argument("profiles", nargs="+", help="profile folders")
    p.set_defaults(func=cmd_verify)
    return ap


ERRORS = (SubsetError, ExportError, ConfigError, CheckpointError, ProfileError, ModelNotFound, FileExistsError, UnicodeDecodeError,
          PoolError, TokenizerError, OSError, ValueError)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
