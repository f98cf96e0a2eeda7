"""Which experts to keep per layer. Every selector: `Selector(keep, ...).fit(...).experts_`
({layer: sorted original ids}). Shared experts are always kept and count toward `keep`."""

from __future__ import annotations

import numpy as np
import torch

from modeling import Model

from .errors import SubsetError
from .fingerprint import Fingerprints, LayerObserver, LayerPass, Layout

METHODS = ("mean-prob", "layerwise", "output-aware", "random")


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
    return keep


def choose(scores: np.ndarray, layout: Layout, layer: int, keep: int) -> list[int]:
    """Shared experts, then the best-scoring others (ties by lower id) up to `keep`."""
    shared = sorted(layout.shared[layer])
    others = [e for e in layout.loaded[layer] if e not in set(shared)]
    n = keep - len(shared)
    if n < 0 or n > len(others):
        raise SubsetError(f"layer {layer}: cannot keep {keep} experts with {len(shared)} shared of {len(layout.loaded[layer])}")
    ranked = sorted(others, key=lambda e: (-float(scores[e]), e))
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


class _Selector:
    method = ""

    def __init__(self, keep: dict[int, int], seed: int = 0):
        self.keep, self.seed = keep, seed

    def params(self) -> dict:
        return {"keep": {str(k): v for k, v in self.keep.items()}}


class MeanProbSelector(_Selector):
    """AllenAI's default: the routing softmax averaged over every calibration token, top-n per layer."""

    method = "mean-prob"

    def fit(self, fp: Fingerprints) -> "MeanProbSelector":
        self.scores_ = fp.token_mean()
        self.experts_ = {i: choose(self.scores_[i], fp.layout, i, n) for i, n in self.keep.items()}
        return self


class RandomSelector(_Selector):
    """Baseline: a seeded random choice of the non-shared experts."""

    method = "random"

    def params(self) -> dict:
        return {**super().params(), "seed": self.seed}

    def fit(self, layout: Layout | Fingerprints) -> "RandomSelector":
        layout = layout.layout if isinstance(layout, Fingerprints) else layout
        rng = np.random.default_rng(self.seed)
        scores = rng.random((layout.num_layers, max(layout.width, 1)))
        self.experts_ = {i: choose(scores[i], layout, i, n) for i, n in self.keep.items()}
        return self


class _LayerwiseObserver(LayerObserver):
    def __init__(self, sel: "LayerwiseSelector", model: Model, layout: Layout):
        self.sel, self.model, self.layout = sel, model, layout
        self.sums: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}

    def observe(self, i, le, h, x, docs, counts):
        p = self.model.transformer.route(i, h).probs.sum(0).double()
        self.sums[i] = self.sums.get(i, 0) + p
        self.tokens[i] = self.tokens.get(i, 0) + h.shape[0]

    def mask(self, i, le):
        scores = np.zeros(max(self.layout.width, 1))
        scores[le.ids] = (self.sums[i] / self.tokens[i]).cpu().numpy()
        ids = choose(scores, self.layout, i, self.sel.keep[i])
        self.sel.experts_[i] = ids
        self.sel.scores_[i] = scores
        return torch.tensor([e in set(ids) for e in le.ids], dtype=torch.bool)


class LayerwiseSelector(_Selector):
    """Greedy, layer by layer: each layer's mean routing softmax is measured with the
    earlier layers already pruned to their choice."""

    method = "layerwise"

    def __init__(self, model: Model, keep: dict[int, int], max_batch_tokens: int = 16384, progress: bool = False):
        super().__init__(keep)
        self.model, self.max_batch_tokens, self.progress = model, max_batch_tokens, progress

    def fit(self, token_lists: list[list[int]]) -> "LayerwiseSelector":
        self.experts_, self.scores_ = {}, {}
        obs = _LayerwiseObserver(self, self.model, Layout.of(self.model))
        LayerPass(self.model, self.max_batch_tokens, progress=self.progress, desc="layerwise").run(token_lists, obs)
        return self


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


class OutputAwareSelector(_Selector):
    """Router weight x expert output norm, weighted per token by how much the MoE
    output changes the hidden state (|moe(h)| / |x|), summed over calibration tokens."""

    method = "output-aware"

    def __init__(self, model: Model, keep: dict[int, int], max_batch_tokens: int = 16384, progress: bool = False):
        super().__init__(keep)
        self.model, self.max_batch_tokens, self.progress = model, max_batch_tokens, progress

    def fit(self, token_lists: list[list[int]]) -> "OutputAwareSelector":
        layout = Layout.of(self.model)
        obs = _OutputAwareObserver(self.model, layout)
        LayerPass(self.model, self.max_batch_tokens, progress=self.progress, desc="output-aware").run(token_lists, obs)
        self.scores_ = obs.scores
        self.experts_ = {i: choose(obs.scores[i], layout, i, n) for i, n in self.keep.items()}
        return self


def read_experts_file(path: str, layout: Layout) -> dict[int, list[int]]:
    """JSON {layer index: [original expert ids]}; every MoE layer must be listed."""
    import json
    from pathlib import Path

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
            i = int(k)
            ids = [int(x) for x in v]
        except (TypeError, ValueError):
            raise SubsetError(f"{p}: layer {k!r}: expected a list of integer expert ids") from None
        if i not in layout.moe_layers:
            raise SubsetError(f"{p}: layer {i} is not a mixture-of-experts layer of the model (layers {layout.moe_layers})")
        bad = [e for e in ids if e not in set(layout.loaded[i])]
        if bad:
            raise SubsetError(f"{p}: layer {i}: expert id {bad[0]} is out of range (the model has experts "
                              f"{_ranges(layout.loaded[i])})")
        if len(set(ids)) != len(ids):
            raise SubsetError(f"{p}: layer {i} lists an expert twice")
        out[i] = sorted(ids)
    missing = [i for i in layout.moe_layers if i not in out]
    if missing:
        raise SubsetError(f"{p}: no experts listed for layer {missing[0]}")
    for i, ids in out.items():
        k = min(layout.top_k, layout.num_original[i])
        if len(ids) < k:
            raise SubsetError(f"{p}: layer {i} keeps {len(ids)} experts, fewer than top-k {k}")
        miss = [e for e in layout.shared[i] if e not in ids]
        if miss:
            raise SubsetError(f"{p}: layer {i} leaves out shared expert {miss[0]} (shared experts are always kept)")
    return out


def _ranges(ids: list[int]) -> str:
    ids = sorted(ids)
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ",".join(map(str, ids))
