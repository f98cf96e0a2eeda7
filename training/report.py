"""Evaluate the bundled twins through `modeling.load_model` and write the report.

    python -m training.report --emo modeling/bundled/emo-demo --std modeling/bundled/stdmoe-demo \
        --emo-log runs/emo/log.jsonl --std-log runs/std/log.jsonl --out reports/training

Writes ``curves.png`` (training loss per domain, both twins, and periodic
held-out loss), ``results.json`` (the figures the tests check) and
``README.md``. Everything is measured on the committed held-out split
``training/data/heldout.jsonl`` with the bf16 bundles loaded by `load_model`
and computed in float32.

Measures:

- held-out perplexity per domain: every held-out document is scored on its
  first ``ctx`` tokens after an eos (bos) token; ``ppl = exp(sum nll / tokens)``
  over the domain. ``quick`` is the same on the first ``QUICK_DOCS`` documents
  per domain (what the test recomputes).
- modularity: the held-out documents of each domain are split in half. On the
  first half (calibration) the router softmax over the routed (non-shared)
  experts is averaged per layer; the domain's 25% most used experts (8) are the
  top of that average. On the second half we report the share of router mass
  falling on those experts (averaged over tokens and layers). Uniform routing
  would give 8/31 (EMO, 31 routed experts) or 8/32 (standard).
- pool perplexity: the same 25% profile used as a routing pool (8 of the 32
  experts per layer: for EMO 7 routed + the shared one, for the standard twin
  8 routed), perplexity on the second half, next to the full model's.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from training.corpus import DOMAINS, HELDOUT_PATH, load_jsonl

QUICK_DOCS = 6
CTX = 256
TOP_SHARE = 0.25
RESULTS = "results.json"


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def doc_tokens(tok, text: str, eos_id: int, ctx: int = CTX) -> list[int]:
    return ([eos_id] + tok.encode(text).ids)[: ctx + 1]


def domain_docs(rows, domain):
    return [r for r in rows if r["domain"] == domain]


@torch.no_grad()
def nll_sum(model, ids: list[int], pool=None) -> tuple[float, int]:
    logits = model.logits(ids[:-1], pool=pool).float()
    tgt = torch.tensor(ids[1:])
    return float(F.cross_entropy(logits, tgt, reduction="sum")), len(ids) - 1


def heldout_ppl(model, rows, tok, eos_id: int, max_docs: int | None = None, pools=None,
                doc_slice: slice | None = None) -> dict[str, float]:
    out = {}
    for d in DOMAINS:
        docs = domain_docs(rows, d)
        docs = docs[doc_slice] if doc_slice is not None else docs[:max_docs]
        if not docs:
            continue
        tot, n = 0.0, 0
        for r in docs:
            s, c = nll_sum(model, doc_tokens(tok, r["text"], eos_id), pools[d] if pools else None)
            tot, n = tot + s, n + c
        out[d] = math.exp(tot / n)
    return out


def eos_of(model) -> int:
    ids = model.config.eos_token_ids
    return ids[0] if isinstance(ids, (list, tuple)) else int(ids)


def _routed(cfg) -> int:
    return cfg.experts_per_layer[0] - cfg.shared_per_layer[0]


@torch.no_grad()
def routed_probs(model, ids: list[int]) -> list[torch.Tensor]:
    """Per layer `[T, R]`: the routing softmax over the routed (non-shared) experts."""
    R = _routed(model.config)
    return [p[:, :R].float() for p in model.router_probs(ids)]


def modularity(model, rows, tok, eos_id: int, share: float = TOP_SHARE) -> dict:
    cfg = model.config
    R = _routed(cfg)
    E = cfg.experts_per_layer[0]
    n_top = max(1, round(share * E))
    res = {"n_top": n_top, "routed_experts": R, "uniform_share": n_top / R, "domains": {}}
    pools = {}
    for d in DOMAINS:
        docs = domain_docs(rows, d)
        half = len(docs) // 2
        calib, meas = docs[:half], docs[half:]
        L = cfg.num_layers
        acc = [torch.zeros(R) for _ in range(L)]
        for r in calib:
            for i, p in enumerate(routed_probs(model, doc_tokens(tok, r["text"], eos_id))):
                acc[i] += p.mean(0)
        top = [torch.topk(a, n_top).indices for a in acc]
        shares = []
        for r in meas:
            ps = routed_probs(model, doc_tokens(tok, r["text"], eos_id))
            shares.append(torch.stack([p[:, top[i]].sum(-1).mean() for i, p in enumerate(ps)]))
        per_layer = torch.stack(shares).mean(0)
        res["domains"][d] = {"share": float(per_layer.mean()), "per_layer": [round(float(x), 4) for x in per_layer],
                             "top_experts": [sorted(t.tolist()) for t in top]}
        # the 25% routing pool: n_top experts per layer in all, shared ones included
        s = cfg.shared_per_layer[0]
        shared_ids = list(range(E - s, E))
        pools[d] = {i: sorted(top[i][: n_top - s].tolist()) + shared_ids for i in range(L)}
    # overlap between domains' top sets (Jaccard, mean over layers)
    jac = {}
    for a in DOMAINS:
        for b in DOMAINS:
            if a < b:
                ta, tb = res["domains"][a]["top_experts"], res["domains"][b]["top_experts"]
                jac[f"{a}/{b}"] = round(sum(len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(ta, tb)) / len(ta), 3)
    res["jaccard_between_domains"] = jac
    res["mean_share"] = sum(v["share"] for v in res["domains"].values()) / len(res["domains"])
    return res, pools


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 40) -> str:
    ids = tok.encode(prompt).ids
    out = []
    for _ in range(n):
        nxt = int(model.logits(ids + out)[-1].argmax())
        if nxt == eos_of(model):
            break
        out.append(nxt)
    return tok.decode(out)


PY_PROMPT = ("import os\nimport sys\n\n\nclass Reader:\n    def __init__(self, path):\n"
             "        self.path = path\n\n    def read(self")


def evaluate(path: Path, rows) -> dict:
    from modeling import load_model

    model = load_model(path, dtype=torch.float32)
    tok = _tokenizer(path)
    eos = eos_of(model)
    r = {"path": str(path)}
    r["heldout_ppl"] = heldout_ppl(model, rows, tok, eos)
    r["quick_ppl"] = heldout_ppl(model, rows, tok, eos, max_docs=QUICK_DOCS)
    mod, pools = modularity(model, rows, tok, eos)
    r["modularity"] = mod
    second = slice(len(domain_docs(rows, DOMAINS[0])) // 2, None)
    r["second_half_ppl_full"] = heldout_ppl(model, rows, tok, eos, doc_slice=second)
    r["second_half_ppl_pool25"] = heldout_ppl(model, rows, tok, eos, doc_slice=second, pools=pools)
    r["pools25"] = {d: {str(k): v for k, v in p.items()} for d, p in pools.items()}
    r["python_prompt"] = PY_PROMPT
    r["python_greedy"] = greedy(model, tok, PY_PROMPT)
    r["bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return r


def read_log(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def ema(xs, a=0.05):
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - a) * m + a * x
        out.append(m)
    return out


def plot(logs: dict[str, list[dict]], out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(4.2 * len(DOMAINS), 3.6), sharey=False)
    colors = {"emo": "tab:red", "std": "tab:blue"}
    for ax, d in zip(axes, DOMAINS):
        for name, log in logs.items():
            steps = [r["step"] for r in log]
            ax.plot(steps, ema([r["domain_loss"][d] for r in log]), color=colors[name], lw=1.2,
                    label=f"{name} train (EMA)")
            ev = [r for r in log if "heldout_loss" in r]
            ax.plot([r["step"] for r in ev], [r["heldout_loss"][d] for r in ev], "o--", color=colors[name],
                    ms=3, lw=0.8, label=f"{name} held-out")
        ax.set_title(d)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def fmt_table(res) -> str:
    lines = ["| domain | EMO ppl | standard ppl |", "|---|---:|---:|"]
    for d in DOMAINS:
        lines.append(f"| {d} | {res['emo']['heldout_ppl'][d]:.2f} | {res['std']['heldout_ppl'][d]:.2f} |")
    return "\n".join(lines)


def write_markdown(res: dict, out: Path, train_info: dict):
    e, s = res["emo"], res["std"]
    me, ms = e["modularity"], s["modularity"]
    L = []
    L.append("# The bundled demo twins: training and emergent modularity\n")
    L.append("Generated by `python -m training.report` from the bf16 bundles in `modeling/bundled/` "
             "(loaded with `modeling.load_model`, computed in float32) on the committed held-out split "
             "`training/data/heldout.jsonl` (40 documents per domain, each capped to 2000 characters, "
             "scored on its first 256 tokens after an eos token).\n")
    L.append("## Training\n")
    for k, v in train_info.items():
        L.append(f"- {k}: {v}")
    L.append("\n![training curves](curves.png)\n")
    L.append("## Held-out perplexity per domain (full model, no pool)\n")
    L.append(fmt_table(res) + "\n")
    L.append("## Modularity from the router\n")
    L.append(f"For each domain, its 25% most used routed experts per layer ({me['n_top']}) are chosen on the first "
             "half of its held-out documents (mean router softmax over the routed experts); the table gives the "
             "share of router mass that the second half puts on them, averaged over tokens and layers. "
             f"Uniform routing would give {me['uniform_share']:.3f} (EMO: {me['routed_experts']} routed experts) "
             f"and {ms['uniform_share']:.3f} (standard: {ms['routed_experts']}).\n")
    L.append("| domain | EMO share | standard share | EMO per layer | standard per layer |")
    L.append("|---|---:|---:|---|---|")
    for d in DOMAINS:
        L.append(f"| {d} | {me['domains'][d]['share']:.3f} | {ms['domains'][d]['share']:.3f} | "
                 f"{me['domains'][d]['per_layer']} | {ms['domains'][d]['per_layer']} |")
    L.append(f"| **mean** | **{me['mean_share']:.3f}** | **{ms['mean_share']:.3f}** | | |\n")
    L.append("Overlap of the domains' top sets (Jaccard, mean over layers; lower = more domain-specific):\n")
    L.append("| pair | EMO | standard |")
    L.append("|---|---:|---:|")
    for k in me["jaccard_between_domains"]:
        L.append(f"| {k} | {me['jaccard_between_domains'][k]:.3f} | {ms['jaccard_between_domains'][k]:.3f} |")
    L.append("")
    L.append("## A 25% profile as a routing pool\n")
    L.append("The same per-domain top sets used as a pool (8 of the 32 experts in every layer: EMO 7 routed + its "
             "shared expert, standard 8 routed), perplexity on the second half of the held-out documents:\n")
    L.append("| domain | EMO full | EMO pool 25% | change | standard full | standard pool 25% | change |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    for d in DOMAINS:
        ef, ep = e["second_half_ppl_full"][d], e["second_half_ppl_pool25"][d]
        sf, sp = s["second_half_ppl_full"][d], s["second_half_ppl_pool25"][d]
        L.append(f"| {d} | {ef:.2f} | {ep:.2f} | {100 * (ep / ef - 1):+.1f}% | {sf:.2f} | {sp:.2f} | "
                 f"{100 * (sp / sf - 1):+.1f}% |")
    L.append("")
    L.append("## Greedy continuation of a Python prompt (EMO twin)\n")
    L.append("```python\n" + e["python_prompt"] + e["python_greedy"] + "\n```\n")
    L.append("Standard twin:\n")
    L.append("```python\n" + s["python_prompt"] + s["python_greedy"] + "\n```\n")
    if res.get("discussion"):
        L.append("## Discussion\n")
        L.append(res["discussion"] + "\n")
    L.append("## Reproduce\n")
    L.append("```sh\n" + REPRO + "```\n")
    (out / "README.md").write_text("\n".join(L))


REPRO = """python -m training.corpus --out runs/corpus          # corpus + training/data/heldout.jsonl
python -m training.tokenizer --corpus runs/corpus/train.jsonl --out runs/tokenizer
# as run for the bundles: both twins started with --steps 850; the shared machine ran slower than
# measured, so both were stopped after their step-200 checkpoint and resumed with --steps 650
# (the cosine schedule switches from an 850- to a 650-step horizon at step 200: lr 1.85e-3 -> 1.74e-3).
# A single `--steps 650` run is the simpler variant of the same recipe.
for v in emo std; do
  OMP_NUM_THREADS=1 nohup python -m training.train --variant $v --out runs/$v --steps 650 --resume \\
      --no-progress > runs/train_$v.log 2>&1 &
done; wait
cp -r runs/emo/bundle modeling/bundled/emo-demo; cp -r runs/std/bundle modeling/bundled/stdmoe-demo
python -m training.report --discussion reports/training/discussion.md   # defaults: the bundles and runs/*/log.jsonl
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emo", default="modeling/bundled/emo-demo")
    ap.add_argument("--std", default="modeling/bundled/stdmoe-demo")
    ap.add_argument("--emo-log", default="runs/emo/log.jsonl")
    ap.add_argument("--std-log", default="runs/std/log.jsonl")
    ap.add_argument("--heldout", default=str(HELDOUT_PATH))
    ap.add_argument("--out", default="reports/training")
    ap.add_argument("--discussion", default=None, help="a markdown file appended as the discussion")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_jsonl(a.heldout)
    logs = {"emo": read_log(a.emo_log), "std": read_log(a.std_log)}
    plot(logs, out / "curves.png")
    for name, log in logs.items():  # keep the logs, compressed
        with open(a.emo_log if name == "emo" else a.std_log, "rb") as src, \
                gzip.open(out / f"train_{name}.log.jsonl.gz", "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
    res = {"emo": evaluate(Path(a.emo), rows), "std": evaluate(Path(a.std), rows)}
    info = {}
    for name, log in logs.items():
        last = log[-1]
        res[name]["train"] = {"steps": last["step"], "tokens": last["tokens"], "seconds": last["time"],
                              "tokens_per_s": round(last["tokens"] / last["time"], 1),
                              "final_heldout_loss_in_training": next(
                                  (r["heldout_loss"] for r in reversed(log) if "heldout_loss" in r), None)}
        info[f"{name} twin"] = (f"{last['step']} steps, {last['tokens']:,} tokens, {last['time'] / 60:.1f} min on one "
                                f"CPU thread ({last['tokens'] / last['time']:.0f} tokens/s), bundle "
                                f"{res[name]['bytes'] / 1e6:.1f} MB bf16")
    cfg_path = Path(a.emo_log).parent / "train_config.json"
    if cfg_path.exists():
        tc = json.loads(cfg_path.read_text())
        m, args = tc["model"], tc["args"]
        info["shape"] = (f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
                         f"{m['num_experts']} experts of intermediate {m['intermediate_size']} per layer, top-"
                         f"{m['num_experts_per_tok']}, vocab {m['vocab_size']}, context {args['ctx']}")
        info["recipe"] = (f"AdamW lr {args['lr']} (warm-up {args['warmup']}, cosine to 10%), batch {args['batch']} "
                          f"sequences (equal per domain, one document chunk each), load balance {args['lb']} over the "
                          f"whole batch, z-loss {args['zloss']}; EMO: 1 shared expert, per-document pool of N routed "
                          f"experts, N ~ U[{args['pool_min']}, {m['num_experts'] - 1}]; identical data order and steps")
    if a.discussion:
        res["discussion"] = Path(a.discussion).read_text()
    (out / RESULTS).write_text(json.dumps(res, indent=1))
    write_markdown(res, out, info)
    print(json.dumps({n: {"ppl": res[n]["heldout_ppl"], "share": res[n]["modularity"]["mean_share"]}
                      for n in ("emo", "std")}, indent=1))


if __name__ == "__main__":
    main()
