"""Expert routing, exactly as emo-format.md states it.

`route` is a pure function of float32 router logits `[T, S]` over the S expert
*slots* a layer has loaded. Everything that changes the choice is a mask:

- `allowed` `[T, S]`: the token's pool. Experts outside it get a -inf logit
  before any softmax, which is what "restricting routing to a pool" means.
- `shared` `[S]`: shared experts (EMO keeps them last). Softmax is taken
  separately over the non-shared and the shared logits; top-(k-s) of the first,
  top-s of the second, no renormalisation.
- `always_active` `[S]`: softmax over all; these are always taken with their own
  probability and the rest of the k come from top-k among the others.

The function is differentiable in `logits`, so training uses it too (the EMO
recipe's per-document pool is `allowed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Route:
    weights: Tensor  # [T, k] float32, 0 where not valid
    indices: Tensor  # [T, k] int64 slot indices
    valid: Tensor  # [T, k] bool: False where the pool had fewer than k experts
    probs: Tensor  # [T, S] float32: the routing softmax (per group when experts are shared)


def _softmax(logits: Tensor) -> Tensor:
    # A row whose logits are all -inf (an empty group inside a pool) softmaxes
    # to NaN; it holds no probability at all.
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def route(
    logits: Tensor,
    *,
    top_k: int,
    allowed: Tensor | None = None,
    shared: Tensor | None = None,
    always_active: Tensor | None = None,
    norm_topk_prob: bool = False,
) -> Route:
    logits = logits.float()
    T, S = logits.shape
    k = min(top_k, S)  # k never exceeds the experts a layer has
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    avail = allowed if allowed is not None else torch.ones(T, S, dtype=torch.bool, device=logits.device)

    if shared is not None and bool(shared.any()):
        n_shared = int(shared.sum())
        sh = shared.unsqueeze(0).expand(T, S)
        p_routed = _softmax(logits.masked_fill(sh, float("-inf")))
        p_shared = _softmax(logits.masked_fill(~sh, float("-inf")))
        w_r, i_r = torch.topk(p_routed, max(0, min(k - n_shared, S - n_shared)), dim=-1)
        w_s, i_s = torch.topk(p_shared, min(n_shared, k), dim=-1)
        weights, indices = torch.cat([w_r, w_s], -1), torch.cat([i_r, i_s], -1)
        probs = torch.where(sh, p_shared, p_routed)
        renormalise = False
    elif always_active is not None and bool(always_active.any()):
        probs = _softmax(logits)
        aa_ids = always_active.nonzero().flatten()[:k]
        w_a = probs[:, aa_ids]
        # The always-active ones are excluded from the top-k of the rest.
        w_r, i_r = torch.topk(probs.masked_fill(always_active.unsqueeze(0), -1.0), k - aa_ids.numel(), dim=-1)
        weights = torch.cat([w_a, w_r], -1)
        indices = torch.cat([aa_ids.unsqueeze(0).expand(T, -1), i_r], -1)
        renormalise = norm_topk_prob
    else:
        probs = _softmax(logits)
        weights, indices = torch.topk(probs, k, dim=-1)
        renormalise = norm_topk_prob

    valid = torch.gather(avail, 1, indices)
    weights = weights * valid
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return Route(weights=weights, indices=indices, valid=valid, probs=probs)
