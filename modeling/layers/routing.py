"""Expert routing, written once for every family.

A family declares its rule (`RoutingRule`): how router logits become scores
(`softmax`, or `sigmoid` with a DeepSeek-style correction bias that shifts the
*choice* only), how experts are chosen (top-k, optionally group-limited:
`n_group` groups, the best `topk_group` of them by the sum of their two best
scores, then top-k inside those) and how the chosen are weighted (renormalised
to sum 1, then multiplied by `scaling`). Shared experts that live *inside* the
router (EMO's last s slots, see docs/formats.md) are a mask here; shared experts
that are a separate always-on MLP (GLM's `mlp.shared_experts`) never reach the
router at all.

`route` is a pure function of router logits `[T, S]` over the S expert *slots*
a layer has loaded. Everything that changes the choice is a mask:

- `allowed` `[T, S]`: the token's pool. Experts outside it are excluded before
  any softmax, group or top-k step, which is what "restricting routing to a
  pool" means: the forward pass equals that of a checkpoint pruned to the pool.
- `shared` `[S]` (softmax only): softmax is taken separately over the
  non-shared and the shared logits; top-(k-s) of the first, top-s of the
  second, no renormalisation.
- `always_active` `[S]` (softmax only): softmax over all; these are always
  taken with their own probability and the rest of the k come from top-k
  among the others.
- `groups` `[S]`: the expert group of each slot (group-limited choice).

The function is differentiable in `logits`, so training uses it too (the EMO
recipe's per-document pool is `allowed`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingRule:
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    n_group: int = 1  # > 1: group-limited choice
    topk_group: int = 1
    renormalise: bool = False  # divide the k weights by their sum (norm_topk_prob)
    scaling: float = 1.0  # routed_scaling_factor, applied after renormalising
    correction_bias: bool = False  # sigmoid routers: e_score_correction_bias shifts the choice
    router_float32: bool = False  # the router product itself runs in float32 (GLM, DeepSeek)

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1

    def group_of(self, expert: int, num_experts: int) -> int:
        return expert_group(expert, num_experts, self.n_group)


def expert_group(expert: int, num_experts: int, n_group: int) -> int:
    """The routing group of expert `expert` of `num_experts` (ids counted as the
    router that groups them counts them): `n_group` consecutive equal blocks, 0
    unless group-limited. The one place the formula is written."""
    return expert // (num_experts // n_group) if n_group > 1 else 0


@dataclass
class Route:
    weights: Tensor  # [T, k] float32, 0 where not valid
    indices: Tensor  # [T, k] int64 slot indices
    valid: Tensor  # [T, k] bool: False where the pool had fewer than k experts
    probs: Tensor  # [T, S] float32: the routing softmax (per group when experts are shared);
    #                for sigmoid routers the choice scores (bias included) normalised to sum 1
    all_valid: bool = False  # known without looking: every entry of `valid` is True (no pool restricted it)


def _softmax(logits: Tensor) -> Tensor:
    # A row whose logits are all -inf (an empty group inside a pool) softmaxes
    # to NaN; it holds no probability at all.
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def route(
    logits: Tensor,
    rule: RoutingRule | None = None,
    *,
    top_k: int | None = None,
    allowed: Tensor | None = None,
    shared: Tensor | None = None,
    always_active: Tensor | None = None,
    norm_topk_prob: bool = False,
    bias: Tensor | None = None,
    groups: Tensor | None = None,
) -> Route:
    """Route `logits` by `rule` (or, for the softmax rule, `top_k` and `norm_topk_prob`)."""
    if rule is None:
        rule = RoutingRule(top_k=int(top_k), renormalise=norm_topk_prob)
    logits = logits.float()
    T, S = logits.shape
    k = min(rule.top_k, S)  # k never exceeds the experts a layer has
    if rule.scoring == "sigmoid":
        return _route_sigmoid(logits, rule, k, allowed, bias, groups)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))

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
        renormalise = rule.renormalise
    else:
        probs = _softmax(logits)
        weights, indices = torch.topk(probs, k, dim=-1)
        renormalise = rule.renormalise

    if allowed is None:  # every expert is available: nothing to mask (a decode step's common case, kept short)
        return Route(_weigh(weights, renormalise, rule.scaling), indices, torch.ones_like(indices, dtype=torch.bool),
                     probs, all_valid=True)
    valid = torch.gather(allowed, 1, indices)
    weights = _weigh(weights * valid, renormalise, rule.scaling)
    return Route(weights=weights, indices=indices, valid=valid, probs=probs)


def _weigh(weights: Tensor, renormalise: bool, scaling: float) -> Tensor:
    if renormalise:
        # + 1e-20 as DeepSeek / GLM write it; a row with no valid expert stays 0.
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling if scaling != 1.0 else weights


def _route_sigmoid(logits: Tensor, rule: RoutingRule, k: int, allowed: Tensor | None, bias: Tensor | None,
                   groups: Tensor | None) -> Route:
    """DeepSeek-V3 / GLM-4.5: weights from sigmoid scores, choice from scores + bias."""
    scores = torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias.float()
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    if rule.group_limited:
        choice = _limit_to_groups(choice, rule, groups)
    top, indices = torch.topk(choice, k, dim=-1)
    valid = torch.isfinite(top)
    weights = _weigh(scores.gather(1, indices) * valid, rule.renormalise, rule.scaling)
    # What fingerprints average: the choice scores, normalised over the allowed experts.
    c = choice.clamp_min(0.0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    probs = c / c.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return Route(weights=weights, indices=indices, valid=valid, probs=probs)


def _limit_to_groups(choice: Tensor, rule: RoutingRule, groups: Tensor | None) -> Tensor:
    """Keep the experts of the `topk_group` best groups (a group scores the sum of
    its two best choice scores); the rest get -inf.

    Groups are given per slot, since a pool or a profile may hold any subset of
    a group. A group with one allowed expert scores that one; a group with none
    scores -inf. On a full layer this is exactly transformers' rule.
    """
    if groups is None:
        raise ValueError("group-limited routing needs the expert group of every slot")
    T = choice.shape[0]
    gscore = torch.full((T, rule.n_group), float("-inf"), device=choice.device)
    for g in range(rule.n_group):
        cols = (groups == g).nonzero().flatten()
        if cols.numel() == 0:
            continue
        best = torch.topk(choice[:, cols], min(2, cols.numel()), dim=-1).values
        finite = torch.isfinite(best)
        s = best.where(finite, torch.zeros_like(best)).sum(-1)
        gscore[:, g] = s.where(finite.any(-1), torch.full_like(s, float("-inf")))
    chosen = torch.topk(gscore, min(rule.topk_group, rule.n_group), dim=-1).indices  # [T, topk_group]
    keep_group = torch.zeros(T, rule.n_group, dtype=torch.bool, device=choice.device).scatter_(1, chosen, True)
    return choice.masked_fill(~keep_group[:, groups], float("-inf"))
