"""Which experts to keep per layer.

Every selector follows one contract (scikit-learn's estimator shape):

    selector = SELECTORS[method](keep, seed=0)     # keep: {layer: experts to keep}
    selector.fit(calibration)                      # a `Calibration`; returns the selector
    selector.experts_                              # {layer: sorted original ids}
    selector.scores_                               # [layers, experts] what the choice ranked

A selector subclasses `Selector`, names the parts of the `Calibration` it
`needs` ("fingerprints", "token_lists", "model") and implements `score(cal)`:
one score per original expert and layer, higher is kept first. `fit` checks
the needs and turns scores into a kept set with `choose` (shared experts
always kept; for group-limited routers the same count from every group). A
new method is a subclass passed to `register`; the CLI offers every entry of
`SELECTORS`. `validate_kept` is the one check of a kept set (used for
experts files and by the writer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from modeling import Model

from .errors import SubsetError
from .fingerprint import Fingerprints, LayerObserver, LayerPass, Layout


@dataclass
class Calibration:
    """What a selector may learn from. `layout` is always there; the rest only
    when the calibration text was given (and the model, for methods that run it)."""

    layout: Layout
    fingerprints: Fingerprints | None = None
    token_lists: list[list[int]] | None = None  # token ids of the calibration documents
    model: Model | None = None
    max_batch_tokens: int = 16384
    progress: bool = False


def parse_keep(spec: str | int | list, layout: Layout) -> dict[int, int]:
    """`8`, `25%`, or a per-layer schedule `8,8,4,4` (one entry per MoE layer, or per layer)."""
    moe = layout.moe_layers
    if isinstance(spec, int):
        vals = [spec] * len(moe)
    else:
        s = str(spec).strip()
        try:
            if s.endswith("%"):
                frac = float(s[:-1]) / 100
                vals = [max(1, round(frac * layout.num_original[i])) for i in moe]
            elif "," in s:
                parts = [int(p) for p in s.split(",")]
                if len(parts) == layout.num_layers:
                    parts = [parts[i] for i in moe]
                if len(parts) != len(moe):
                    raise SubsetError(f"--keep schedule has {len(parts)} entries; the model has {len(moe)} MoE layers")
                vals = parts
            else:
                vals = [int(s)] * len(moe)
        except ValueError:
            raise SubsetError(f"--keep {spec!r}: expected a number, a percentage or a comma-separated schedule") from None
    keep = dict(zip(moe, vals))
    for i, n in keep.items():
        k = min(layout.top_k, layout.num_original[i])
        if n < k:
            raise SubsetError(f"--keep {n} is smaller than the {k} experts each token uses (top-k) in layer {i}")
        if n > len(layout.loaded[i]):
            raise SubsetError(f"--keep {n} is larger than the {len(layout.loaded[i])} experts of layer {i}")
        if layout.n_group > 1 and n % layout.n_group:
            raise SubsetError(f"--keep {n}: the router of layer {i} chooses within {layout.n_group} expert groups; "
                              f"keep a multiple of {layout.n_group} (the same count from every group)")
    return keep


def choose(scores: np.ndarray, layout: Layout, layer: int, keep: int) -> list[int]:
    """Shared experts, then the best-scoring others (ties by lower id) up to `keep`;
    for group-limited routers the best keep / n_group of every group."""
    shared = sorted(layout.shared[layer])
    others = [e for e in layout.loaded[layer] if e not in set(shared)]
    n = keep - len(shared)
    if n < 0 or n > len(others):
        raise SubsetError(f"layer {layer}: cannot keep {keep} experts with {len(shared)} shared of {len(layout.loaded[layer])}")
    ranked = sorted(others, key=lambda e: (-float(scores[e]), e))
    if layout.n_group > 1:
        per = n // layout.n_group
        picked = []
        for g in range(layout.n_group):
            members = [e for e in ranked if layout.group_of(layer, e) == g]
            if len(members) < per:
                raise SubsetError(f"layer {layer}: expert group {g} has {len(members)} experts loaded, "
                                  f"fewer than the {per} to keep from every group")
            picked += members[:per]
        return sorted(picked + shared)
    return sorted(ranked[:n] + shared)


def coverage(mean_probs: np.ndarray, layout: Layout, kept: dict[int, list[int]]) -> dict[int, float]:
    """Share of the routing mass over non-shared experts that the kept set holds, per layer."""
    out = {}
    for i, ids in kept.items():
        sh = set(layout.shared[i])
        routed = [e for e in layout.loaded[i] if e not in sh]
        tot = float(mean_probs[i, routed].sum())
        out[i] = float(mean_probs[i, [e for e in ids if e not in sh]].sum()) / tot if tot > 0 else 0.0
    return out


def validate_kept(kept: dict[int, list[int]], layout: Layout, where: str = "") -> dict[int, list[int]]:
    """The one check of a kept set {layer: original ids}: every MoE layer listed, ids
    loaded and unique, at least top-k, shared experts kept, group-limited routers
    keeping the same count from every group. Returns it with sorted ids."""
    pre = f"{where}: " if where else ""
    out: dict[int, list[int]] = {}
    for i, ids in kept.items():
        if i not in layout.moe_layers:
            raise SubsetError(f"{pre}layer {i} is not a mixture-of-experts layer of the model (layers {layout.moe_layers})")
        bad = [e for e in ids if e not in set(layout.loaded[i])]
        if bad:
            raise SubsetError(f"{pre}layer {i}: expert id {bad[0]} is out of range (the model has experts "
                              f"{_ranges(layout.loaded[i])})")
        if len(set(ids)) != len(ids):
            raise SubsetError(f"{pre}layer {i} lists an expert twice")
        out[i] = sorted(int(e) for e in ids)
    missing = [i for i in layout.moe_layers if i not in out]
    if missing:
        raise SubsetError(f"{pre}no experts listed for layer {missing[0]}")
    for i, ids in out.items():
        k = min(layout.top_k, layout.num_original[i])
        if len(ids) < k:
            raise SubsetError(f"{pre}layer {i} keeps {len(ids)} experts, fewer than top-k {k}")
        miss = [e for e in layout.shared[i] if e not in ids]
        if miss:
            raise SubsetError(f"{pre}layer {i} leaves out shared expert {miss[0]} (shared experts are always kept)")
        if layout.n_group > 1:
            counts = [sum(1 for e in ids if layout.group_of(i, e) == g) for g in range(layout.n_group)]
            if len(set(counts)) != 1:
                raise SubsetError(f"{pre}layer {i} keeps {counts} experts from its {layout.n_group} expert groups; "
                                  f"a group-limited router needs the same count from every group")
            if layout.top_k > layout.topk_group * counts[0]:
                raise SubsetError(f"{pre}layer {i} keeps {counts[0]} experts per group: fewer than top-k "
                                  f"{layout.top_k} in the {layout.topk_group} groups a token chooses")
    return out


# -- selectors --------------------------------------------------------------------------


class Selector:
    """Base of every selection method (see the module docstring for the contract)."""

    method: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()  # of "fingerprints", "token_lists", "model"

    def __init__(self, keep: dict[int, int], seed: int = 0, budget: int | None = None):
        # with a budget, `keep` is the minimum per layer and `fit` sets the count of every layer
        self.keep, self.seed, self.budget = keep, seed, budget

    def params(self) -> dict:
        return {"keep": {str(k): v for k, v in self.keep.items()},
                **({"budget": self.budget, "keep_min": {str(k): v for k, v in self.minimum.items()}}
                   if self.budget is not None else {})}

    def score(self, cal: Calibration) -> np.ndarray:  # [layers, experts]
        raise NotImplementedError

    def fit(self, calibration: Calibration) -> "Selector":
        missing = [n for n in self.needs if getattr(calibration, n) is None]
        if missing:
            raise SubsetError(f"--method {self.method} needs calibration text: --corpus FILES or --fingerprints FP "
                              f"(missing: {', '.join(missing)})")
        layout = calibration.layout
        self.scores_ = self.score(calibration)
        if self.budget is not None:
            self.minimum = getattr(self, "minimum", None) or dict(self.keep)
            self.keep = allocate_budget(self.scores_, layout, self.budget, self.minimum)
        self.experts_ = {i: choose(self.scores_[i], layout, i, n) for i, n in self.keep.items()}
        return self


def allocate_budget(scores: np.ndarray, layout: Layout, budget: int, minimum: dict[int, int]) -> dict[int, int]:
    """Experts per MoE layer for `budget` experts in all (shared ones included): every layer
    gets its `minimum`, the rest goes to the best (layer, expert) pairs by score. Scores are
    made comparable across layers first: each layer's routed scores are divided by their sum
    (for mean-prob, the share of the layer's routing mass)."""
    if layout.n_group > 1:
        raise SubsetError("--budget: the router chooses within expert groups (the same count from every group); "
                          "give a per-layer --keep schedule instead")
    moe = layout.moe_layers
    floor = sum(minimum[i] for i in moe)
    total = sum(len(layout.loaded[i]) for i in moe)
    if budget < floor:
        raise SubsetError(f"--budget {budget} is less than the {floor} experts the per-layer minimum keeps "
                          f"({len(moe)} MoE layers)")
    if budget > total:
        raise SubsetError(f"--budget {budget} is more than the {total} experts the model has in its MoE layers")
    keep = dict(minimum)
    cands = []
    for i in moe:
        sh = set(layout.shared[i])
        routed = [e for e in layout.loaded[i] if e not in sh]
        s = np.clip(np.asarray(scores[i], dtype=np.float64)[routed], 0, None)
        s = s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / max(len(s), 1))
        ranked = sorted(s.tolist(), reverse=True)
        free = minimum[i] - len(sh)  # the minimum takes each layer's best routed experts first
        cands += [(-v, i, r) for r, v in enumerate(ranked) if r >= free]
    for _, i, _ in sorted(cands)[: budget - floor]:
        keep[i] += 1
    return keep


SELECTORS: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    SELECTORS[cls.method] = cls
    return cls


@register
class MeanProbSelector(Selector):
    """AllenAI's default: the routing softmax averaged over every calibration token, top-n per layer."""

    method = "mean-prob"
    needs = ("fingerprints",)

    def score(self, cal: Calibration) -> np.ndarray:
        return cal.fingerprints.token_mean()


@register
class RandomSelector(Selector):
    """Baseline: a seeded random choice of the non-shared experts."""

    method = "random"

    def params(self) -> dict:
        return {**super().params(), "seed": self.seed}

    def score(self, cal: Calibration) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.random((cal.layout.num_layers, max(cal.layout.width, 1)))


class _LayerwiseObserver(LayerObserver):
    def __init__(self, sel: "LayerwiseSelector", model: Model, layout: Layout):
        self.sel, self.model, self.layout = sel, model, layout
        self.sums: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.scores = np.zeros((layout.num_layers, max(layout.width, 1)))

    def observe(self, i, le, h, x, docs, counts):
        p = self.model.transformer.route(i, h).probs.sum(0).double()
        self.sums[i] = self.sums.get(i, 0) + p
        self.tokens[i] = self.tokens.get(i, 0) + h.shape[0]

    def mask(self, i, le):
        self.scores[i, le.ids] = (self.sums[i] / self.tokens[i]).cpu().numpy()
        ids = set(choose(self.scores[i], self.layout, i, self.sel.keep[i]))
        return torch.tensor([e in ids for e in le.ids], dtype=torch.bool)


@register
class LayerwiseSelector(Selector):
    """Greedy, layer by layer: each layer's mean routing softmax is measured with the
    earlier layers already pruned to their choice."""

    method = "layerwise"
    needs = ("token_lists", "model")

    def score(self, cal: Calibration) -> np.ndarray:
        obs = _LayerwiseObserver(self, cal.model, cal.layout)
        LayerPass(cal.model, cal.max_batch_tokens, progress=cal.progress, desc="layerwise").run(cal.token_lists, obs)
        return obs.scores


class _OutputAwareObserver(LayerObserver):
    def __init__(self, model: Model, layout: Layout):
        self.model, self.layout = model, layout
        self.scores = np.zeros((layout.num_layers, max(layout.width, 1)))

    def observe(self, i, le, h, x, docs, counts):
        m = self.model
        probs = m.transformer.route(i, h).probs
        y, _ = m.transformer.moe(i, h)
        change = (y.float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12))  # [T]
        for s, e in enumerate(le.experts):
            out_norm = m.transformer.expert(e, h).float().norm(dim=-1)
            self.scores[i, le.ids[s]] += float((probs[:, s] * out_norm * change).sum())


@register
class OutputAwareSelector(Selector):
    """Router weight x expert output norm, weighted per token by how much the MoE
    output changes the hidden state (|moe(h)| / |x|), summed over calibration tokens."""

    method = "output-aware"
    needs = ("token_lists", "model")

    def score(self, cal: Calibration) -> np.ndarray:
        obs = _OutputAwareObserver(cal.model, cal.layout)
        LayerPass(cal.model, cal.max_batch_tokens, progress=cal.progress, desc="output-aware").run(cal.token_lists, obs)
        return obs.scores


class _RoutedOutputObserver(LayerObserver):
    """Per routed (token, expert) pair: the gate weight times the norm of the expert's
    output, summed per expert plain (`sums`), weighted per token by how much the MoE
    turns the hidden state (`turned`: 1 - cos(x, x + moe(h)), EASY-EP's token
    contribution), and counted (`counts`: tokens routed to the expert)."""

    def __init__(self, model: Model, layout: Layout):
        self.model = model
        shape = (layout.num_layers, max(layout.width, 1))
        self.sums, self.turned, self.counts = np.zeros(shape), np.zeros(shape), np.zeros(shape)

    def observe(self, i, le, h, x, docs, counts):
        tr = self.model.transformer
        r = tr.route(i, h)
        y, _ = tr.moe(i, h)
        turn = 1 - torch.nn.functional.cosine_similarity(x.float(), (x + y).float(), dim=-1)  # [T]
        T, k = r.indices.shape
        tok = torch.arange(T, device=h.device).repeat_interleave(k)
        slot, gate, ok = r.indices.flatten(), r.weights.flatten().float(), r.valid.flatten()
        for s in slot[ok].unique().tolist():
            sel = ok & (slot == s)
            rows = tok[sel]
            c = gate[sel] * tr.expert(le.experts[s], h[rows]).float().norm(dim=-1)
            self.sums[i, le.ids[s]] += float(c.sum())
            self.turned[i, le.ids[s]] += float((c * turn[rows]).sum())
            self.counts[i, le.ids[s]] += int(rows.numel())


def _routed_outputs(cal: Calibration, desc: str) -> _RoutedOutputObserver:
    obs = _RoutedOutputObserver(cal.model, cal.layout)
    LayerPass(cal.model, cal.max_batch_tokens, progress=cal.progress, desc=desc).run(cal.token_lists, obs)
    return obs


@register
class ReapSelector(Selector):
    """REAP (Cerebras, "router-weighted expert activation pruning"): an expert's score
    is the mean, over the calibration tokens routed to it (its top-k choices), of
    its gate weight times the L2 norm of its output. An expert no token chose scores 0."""

    method = "reap"
    needs = ("token_lists", "model")

    def score(self, cal: Calibration) -> np.ndarray:
        obs = _routed_outputs(cal, "reap")
        return np.divide(obs.sums, obs.counts, out=np.zeros_like(obs.sums), where=obs.counts > 0)


@register
class EasyEpSelector(Selector):
    """EASY-EP (few-shot domain pruning): gate weight times expert output norm for every
    routed (token, expert) pair, weighted by the token's contribution 1 - cos(x, x + moe(h))
    (how much the MoE layer turns its hidden state), summed over the calibration tokens
    (a few demonstrations of the domain suffice)."""

    method = "easy-ep"
    needs = ("token_lists", "model")

    def score(self, cal: Calibration) -> np.ndarray:
        return _routed_outputs(cal, "easy-ep").turned


@register
class ExcludeDomainSelector(Selector):
    """Everything but domain X (a control profile: "no python here").

    Calibration holds every domain, labelled (or clusters, relabelled by the
    CLI). An expert's score is how much more X's tokens route to it than the
    tokens of the kept domain that uses it most: p_X(e) - max over d != X of
    p_d(e), with p the routing softmax averaged over a domain's calibration
    tokens. The lowest-scoring `keep` experts are kept, so the experts dropped
    are those X leans on and no other domain needs as much."""

    method = "exclude-domain"
    needs = ("fingerprints",)

    def __init__(self, keep: dict[int, int], seed: int = 0, exclude: str | None = None):
        super().__init__(keep, seed)
        self.exclude = exclude

    def params(self) -> dict:
        return {**super().params(), "exclude": self.exclude}

    def score(self, cal: Calibration) -> np.ndarray:
        fp = cal.fingerprints
        labels = np.array(fp.labels)
        if self.exclude is None:
            raise SubsetError("--method exclude-domain needs the domain to leave out (--exclude-domain X)")
        domains = sorted({lab for lab in fp.labels if lab})
        if self.exclude not in domains:
            raise SubsetError(f"no calibration documents of {self.exclude!r} to exclude (domains: {', '.join(domains)})")
        others = [d for d in domains if d != self.exclude]
        if not others:
            raise SubsetError(f"calibration holds only {self.exclude!r}: excluding it needs documents of the "
                              "domains to keep as well")
        mean = {d: fp.subset(np.flatnonzero(labels == d)).token_mean().astype(np.float64) for d in domains}
        return -(mean[self.exclude] - np.max([mean[d] for d in others], axis=0))


METHODS = tuple(SELECTORS)


def read_experts_file(path: str, layout: Layout) -> dict[int, list[int]]:
    """JSON {layer index: [original expert ids]} (or a profile.json); every MoE layer must be listed."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SubsetError(f"{p}: no such experts file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubsetError(f"{p}: not valid JSON ({e})") from None
    if isinstance(d, dict) and "kept_experts" in d:
        d = d["kept_experts"]
    if not isinstance(d, dict):
        raise SubsetError(f"{p}: expected a JSON object {{layer: [expert ids]}}")
    out: dict[int, list[int]] = {}
    for k, v in d.items():
        try:
            out[int(k)] = [int(x) for x in v]
        except (TypeError, ValueError):
            raise SubsetError(f"{p}: layer {k!r}: expected a list of integer expert ids") from None
    return validate_kept(out, layout, str(p))


def _ranges(ids: list[int]) -> str:
    ids = sorted(ids)
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ",".join(map(str, ids))
