"""Train an EMO-style MoE or its standard-MoE twin on the multi-domain corpus.

    python -m training.train --variant emo --out runs/emo --steps 900
    python -m training.train --variant std --out runs/std --steps 900

Both variants see identical data in identical order (same --seed) and identical
steps; only routing differs:

- ``emo``: 31 routed experts + 1 shared; per document, the routed softmax is
  averaged over its tokens and only the top-N experts of that average stay
  allowed (N ~ U[--pool-min, 31] per document); per token top-3 of the pool
  plus the shared expert (weight 1.0).
- ``std``: 32 routed experts, per-token softmax top-4.

Load balancing (coefficient --lb) is computed over all tokens of the batch.
Each batch holds the same number of sequences from every domain; a sequence is
a chunk of at most --ctx tokens of one document. Writes ``log.jsonl`` (per-step
loss per domain, periodic held-out loss), ``state.pt`` (resumable) and the
bf16 EMO-format bundle in ``OUT/bundle`` every --save-every steps and at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.corpus import DOMAINS, HELDOUT_PATH, load_jsonl
from training.model import EmoTrainModel, TrainConfig


def tokenize_docs(rows, tok, eos_id: int) -> list[list[int]]:
    encs = tok.encode_batch([r["text"] for r in rows])
    return [[eos_id] + e.ids for e in encs]


def make_chunks(rows, tok, eos_id: int, ctx: int) -> dict[str, list[tuple[int, list[int]]]]:
    """Per domain: (doc_id, tokens) chunks of <= ctx+1 tokens (inputs+targets), overlap 1."""
    ids = tokenize_docs(rows, tok, eos_id)
    out: dict[str, list] = {d: [] for d in DOMAINS}
    for doc_id, (r, t) in enumerate(zip(rows, ids)):
        for s in range(0, max(1, len(t) - 1), ctx):
            piece = t[s: s + ctx + 1]
            if len(piece) >= 2:
                out[r["domain"]].append((doc_id, piece))
    return out


class Batches:
    """Deterministic balanced batches: per_domain chunks of every domain, each domain
    walking through its own shuffled chunk list (reshuffled every epoch)."""

    def __init__(self, chunks, per_domain: int, ctx: int, pad_id: int, seed: int):
        self.chunks, self.per, self.ctx, self.pad = chunks, per_domain, ctx, pad_id
        self.rng = random.Random(seed)
        self.order = {d: [] for d in chunks}
        self.pos = {d: 0 for d in chunks}

    def _take(self, d):
        if self.pos[d] + self.per > len(self.order[d]):
            o = list(range(len(self.chunks[d])))
            self.rng.shuffle(o)
            self.order[d], self.pos[d] = o, 0
        sel = self.order[d][self.pos[d]: self.pos[d] + self.per]
        self.pos[d] += self.per
        return [self.chunks[d][i] for i in sel]

    def next(self):
        items, doms = [], []
        for di, d in enumerate(self.chunks):
            for it in self._take(d):
                items.append(it)
                doms.append(di)
        return collate(items, doms, self.ctx, self.pad)


def collate(items, doms, ctx, pad_id):
    B = len(items)
    S = min(ctx, max(len(t) - 1 for _, t in items))
    x = torch.full((B, S), pad_id, dtype=torch.long)
    y = torch.full((B, S), -100, dtype=torch.long)
    for b, (_, t) in enumerate(items):
        n = min(S, len(t) - 1)
        x[b, :n] = torch.tensor(t[:n])
        y[b, :n] = torch.tensor(t[1: n + 1])
    mask = y != -100
    docs = torch.tensor([d for d, _ in items])
    _, group = torch.unique(docs, return_inverse=True)
    return x, y, mask, group, torch.tensor(doms)


def per_domain_loss(logits, y, dom, n_dom):
    V = logits.shape[-1]
    tl = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1), reduction="none",
                         ignore_index=-100).view(y.shape)
    m = (y != -100).float()
    seq_sum, seq_n = (tl * m).sum(1), m.sum(1)
    dsum = torch.zeros(n_dom).index_add_(0, dom, seq_sum)
    dn = torch.zeros(n_dom).index_add_(0, dom, seq_n)
    return (seq_sum.sum() / seq_n.sum()), dsum / dn.clamp_min(1)


@torch.no_grad()
def eval_heldout(model, held_chunks, ctx, pad_id, bs: int = 16) -> dict[str, float]:
    model.eval()
    res = {}
    for d, items in held_chunks.items():
        tot, n = 0.0, 0
        for i in range(0, len(items), bs):
            part = items[i: i + bs]
            x, y, mask, _, dom = collate(part, [0] * len(part), ctx, pad_id)
            logits, _ = model(x, mask)
            V = logits.shape[-1]
            tl = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum", ignore_index=-100)
            tot += float(tl)
            n += int(mask.sum())
        res[d] = tot / max(n, 1)
    model.train()
    return res


def export_bundle(model: EmoTrainModel, out_dir: Path, tokenizer_dir: Path) -> None:
    cfg = model.config.hf_config()
    tensors = model.export_tensors(torch.bfloat16)
    extra = {"tokenizer.json": tokenizer_dir / "tokenizer.json",
             "tokenizer_config.json": tokenizer_dir / "tokenizer_config.json"}
    try:
        from modeling.io.safetensors_io import write_checkpoint
    except ImportError:  # pragma: no cover - fallback before modeling exports a writer
        write_checkpoint = None
    if write_checkpoint is not None:
        write_checkpoint(out_dir, cfg, tensors, extra_files=extra, force=True)
    else:  # pragma: no cover
        import shutil

        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        for n, src in extra.items():
            shutil.copyfile(src, out_dir / n)


def build_config(a, tok) -> TrainConfig:
    from training.tokenizer import special_ids

    ids = special_ids(tok)
    return TrainConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=a.hidden, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, head_dim=a.hidden // a.heads, intermediate_size=a.intermediate,
        num_experts=a.experts, num_experts_per_tok=a.top_k,
        num_shared_experts=1 if a.variant == "emo" else 0,
        max_position_embeddings=a.ctx, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
    )


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    prog = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=["emo", "std"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", default="runs/corpus/train.jsonl")
    ap.add_argument("--heldout", default=str(HELDOUT_PATH))
    ap.add_argument("--tokenizer", default="runs/tokenizer")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this wall time")
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch (split evenly over domains)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--pool-min", type=int, default=4, help="EMO: smallest document pool (routed experts)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--lb", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--zloss", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-docs", type=int, default=10, help="held-out docs per domain for periodic eval")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--max-docs", type=int, default=0, help="use only the first N training docs per domain")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from tokenizers import Tokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(a.tokenizer)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    cfg = build_config(a, tok)
    rows = load_jsonl(a.corpus)
    if a.max_docs:
        seen: dict[str, int] = {}
        kept = []
        for r in rows:
            if seen.get(r["domain"], 0) < a.max_docs:
                kept.append(r)
                seen[r["domain"]] = seen.get(r["domain"], 0) + 1
        rows = kept
    t0 = time.time()
    chunks = make_chunks(rows, tok, cfg.eos_token_id, a.ctx)
    chunks = {d: v for d, v in chunks.items() if v}
    held_rows = [r for r in load_jsonl(a.heldout)]
    held = {}
    for d in chunks:
        docs = [r for r in held_rows if r["domain"] == d][: a.eval_docs]
        ids = tokenize_docs(docs, tok, cfg.eos_token_id)
        held[d] = [(i, t[: a.ctx + 1]) for i, t in enumerate(ids)]
    doms = list(chunks)
    print(f"chunks per domain: { {d: len(v) for d, v in chunks.items()} } ({time.time() - t0:.1f}s)", flush=True)

    model = EmoTrainModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    per_domain = max(1, a.batch // len(doms))
    batches = Batches(chunks, per_domain, a.ctx, cfg.pad_token_id, a.seed)
    pool_rng = torch.Generator().manual_seed(a.seed + 1)
    start = 0
    state_path = out / "state.pt"
    if a.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        # replay the data order so a resumed run sees the same batches
        for _ in range(start):
            batches.next()
        print(f"resumed at step {start}", flush=True)
        if (out / "log.jsonl").exists():  # drop log lines past the saved state
            lines = [x for x in (out / "log.jsonl").read_text().splitlines()
                     if x.strip() and json.loads(x)["step"] <= start]
            (out / "log.jsonl").write_text("".join(x + "\n" for x in lines))
    (out / "train_config.json").write_text(json.dumps({"args": vars(a), "model": cfg.hf_config(),
                                                       "domains": doms}, indent=1))
    log = open(out / "log.jsonl", "a")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{a.variant}: {n_params / 1e6:.2f}M parameters", flush=True)

    def save(step):
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
        export_bundle(model, out / "bundle", tok_dir)

    t_start = time.time()
    tokens = 0
    if start and (out / "log.jsonl").exists():
        # continue the clock and token count of the run being resumed
        prev = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
        prev = [r for r in prev if r["step"] <= start]
        if prev:
            t_start -= prev[-1]["time"]
            tokens = prev[-1]["tokens"]
    R = cfg.num_experts - cfg.num_shared_experts
    pbar = tqdm(range(start, a.steps), disable=a.no_progress, mininterval=5, desc=a.variant)
    step = start
    for step in pbar:
        x, y, mask, group, dom = batches.next()
        pool_n = None
        if a.variant == "emo":
            G = int(group.max()) + 1
            pool_rng.manual_seed(a.seed + 1 + step)
            pool_n = torch.randint(min(a.pool_min, R), R + 1, (G,), generator=pool_rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        logits, aux = model(x, mask, group, pool_n)
        loss, dl = per_domain_loss(logits, y, dom, len(doms))
        total = loss + a.lb * aux["lb"] + a.zloss * aux["z"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += int(mask.sum())
        el = time.time() - t_start
        rec = {"step": step + 1, "time": round(el, 2), "tokens": tokens, "loss": round(float(loss.detach()), 4),
               "domain_loss": {d: round(float(dl[i].detach()), 4) for i, d in enumerate(doms)},
               "lb": round(float(aux["lb"].detach()), 4), "z": round(float(aux["z"].detach()), 3),
               "gnorm": round(float(gn), 3), "lr": lr_at(step, a)}
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rec["heldout_loss"] = {d: round(v, 4) for d, v in eval_heldout(model, held, a.ctx, cfg.pad_token_id).items()}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        pbar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{tokens / max(el, 1e-6):.0f}")
        if a.no_progress and (step + 1) % 10 == 0:
            print(f"step {step + 1} loss {float(loss.detach()):.3f} {tokens / el:.0f} tok/s", flush=True)
        if (step + 1) % a.save_every == 0:
            save(step + 1)
        if a.max_minutes and el > a.max_minutes * 60:
            print(f"stopping at step {step + 1}: --max-minutes reached", flush=True)
            break
    save(step + 1)
    print(f"done: {step + 1} steps, {tokens} tokens, {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
