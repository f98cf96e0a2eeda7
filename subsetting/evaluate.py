"""Held-out perplexity of profiles against the full model and a random subset of the same size."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm

from modeling import Batch, Model

from .fingerprint import Layout, chunk_documents
from .select import Calibration, RandomSelector


@torch.inference_mode()
def nll(model: Model, token_lists: list[list[int]], pool=None, max_batch_tokens: int = 8192,
        bar: tqdm | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and number of predicted tokens
    (`bar`, when given, advances by the tokens of each batch as it is done)."""
    rpool = model.resolve_pool(pool)
    total, count = 0.0, 0
    for docs in chunk_documents(token_lists, max_batch_tokens):
        seqs = [token_lists[d] for d in docs if len(token_lists[d]) > 1]
        if not seqs:
            continue
        counts = [len(s) for s in seqs]
        tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        batch = Batch(tokens, list(range(len(seqs))), [0] * len(seqs), counts, [rpool] * len(seqs))
        logits = model.forward(batch, model.new_cache(len(seqs), max(counts)), logits_at="all").logits
        lp = torch.log_softmax(logits, dim=-1)
        off = 0
        for n in counts:
            tgt = tokens[off + 1: off + n]
            total -= float(lp[off: off + n - 1].gather(1, tgt[:, None]).sum())
            count += n - 1
            off += n
        if bar is not None:
            bar.update(int(tokens.numel()))
    return total, count


def perplexity(model: Model, token_lists: list[list[int]], pool=None, max_batch_tokens: int = 8192,
               bar: tqdm | None = None) -> float:
    s, n = nll(model, token_lists, pool, max_batch_tokens, bar)
    return math.exp(s / n) if n else float("nan")


def random_pool(layout: Layout, kept: dict[int, list[int]], seed: int = 0) -> dict[int, list[int]]:
    """A random subset with the same number of experts per layer (shared experts kept)."""
    return RandomSelector({i: len(v) for i, v in kept.items()}, seed=seed).fit(Calibration(layout)).experts_


def retention_rows(full: Model, profiles: list[tuple[str, Model, dict]], token_lists_by_domain: dict[str, list[list[int]]],
                   seeds: int = 1, progress: bool = False) -> list[dict[str, Any]]:
    """One row per (profile, domain): perplexity of the profile, full model and random subsets.
    `progress`: one bar over every token of every forward pass this takes."""
    layout = Layout.of(full)
    rows = []
    cache_full: dict[str, float] = {}
    per_domain = {dom: sum(len(t) for t in toks if len(t) > 1) for dom, toks in token_lists_by_domain.items()}
    total = sum(per_domain.values()) * (1 + len(profiles) * (1 + seeds))
    with tqdm(total=total, desc="eval", unit="tok", unit_scale=True, disable=not progress, leave=False) as bar:
        for pname, pmodel, kept in profiles:
            for dom, toks in token_lists_by_domain.items():
                bar.set_postfix_str(f"{pname} / {dom}", refresh=False)
                if dom not in cache_full:
                    cache_full[dom] = perplexity(full, toks, bar=bar)
                p_prof = perplexity(pmodel, toks, bar=bar)
                p_rand = sum(perplexity(full, toks, random_pool(layout, kept, seed=s), bar=bar)
                             for s in range(seeds)) / seeds
                rows.append({"profile": pname, "domain": dom, "experts": sum(len(v) for v in kept.values()),
                             "ppl_profile": p_prof, "ppl_full": cache_full[dom], "ppl_random": p_rand,
                             "retention": cache_full[dom] / p_prof, "retention_random": cache_full[dom] / p_rand})
    return rows
