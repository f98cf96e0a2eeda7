"""How stable is a selection? Refit the selector on bootstrap resamples of the
calibration documents and count the kept experts that change.

A selection that changes with the luck of which documents were sampled is a
property of the calibration set, not of the domain: the shipped arith profile
of the demo differs by one expert between 32 and 64 calibration documents, and
that one expert moves its held-out perplexity from 1.03x to 1.26x the full
model's. Only selectors that learn from fingerprints alone are resampled (the
others run the model, which costs a full pass per resample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .select import Calibration, Selector

# Unstable: on average more than this share of the kept (non-shared) experts
# change under resampling (on the demo's 28 routed experts kept: more than about
# half an expert, i.e. most resamples move one; one expert is worth 1.03x -> 1.26x there).
UNSTABLE_SHARE = 0.02


@dataclass
class Stability:
    resamples: int
    changed_mean: float  # kept experts that differ from the selection, summed over layers, mean over resamples
    changed_max: int
    per_layer_mean: dict[int, float]
    kept_routed: int  # non-shared experts kept, summed over layers
    flips: dict[str, int]  # "layer:expert" -> resamples where that expert left or joined the kept set

    @property
    def share(self) -> float:
        return self.changed_mean / max(self.kept_routed, 1)

    @property
    def stable(self) -> bool:
        return self.share <= UNSTABLE_SHARE

    def to_dict(self) -> dict:
        return {"resamples": self.resamples, "changed_mean": round(self.changed_mean, 3),
                "changed_max": self.changed_max, "changed_share": round(self.share, 4),
                "per_layer_mean": {str(i): round(v, 3) for i, v in self.per_layer_mean.items()},
                "kept_routed": self.kept_routed, "stable": self.stable,
                "threshold_share": UNSTABLE_SHARE,
                "most_changed": dict(sorted(self.flips.items(), key=lambda kv: -kv[1])[:8])}

    def warning(self) -> str | None:
        if self.stable:
            return None
        return (f"unstable selection: on {self.resamples} resamples of the calibration documents, "
                f"{self.changed_mean:.1f} of {self.kept_routed} kept experts change on average (at most "
                f"{self.changed_max}); use more calibration documents")


def resample_stability(selector: Selector, cal: Calibration, resamples: int = 8, seed: int = 0) -> Stability | None:
    """Refit a copy of `selector` (already fitted) on `resamples` bootstrap samples
    of the calibration documents (drawn per domain label); None when the selector needs more than fingerprints."""
    if set(type(selector).needs) - {"fingerprints"} or cal.fingerprints is None or len(cal.fingerprints) < 2:
        return None
    fp, layout = cal.fingerprints, cal.layout
    rng = np.random.default_rng(seed)
    kept = {i: set(v) for i, v in selector.experts_.items()}
    shared = {i: set(layout.shared[i]) for i in kept}
    totals, per_layer = [], {i: 0.0 for i in kept}
    flips: dict[str, int] = {}
    groups = [np.flatnonzero(np.array(fp.labels) == lab) for lab in sorted(set(fp.labels))]
    for _ in range(resamples):
        # stratified by label: every domain keeps its count (an exclusion needs all of them)
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        sub = Calibration(layout, fp.subset(idx), None, None)
        other = _clone(selector).fit(sub).experts_
        n = 0
        for i, ids in other.items():
            diff = kept[i] ^ set(ids)
            for e in diff:
                flips[f"{i}:{e}"] = flips.get(f"{i}:{e}", 0) + 1
            changed = len(diff) // 2  # one expert in, one out
            per_layer[i] += changed / resamples
            n += changed
        totals.append(n)
    kept_routed = sum(len(kept[i] - shared[i]) for i in kept)
    return Stability(resamples, float(np.mean(totals)), int(max(totals)), per_layer, kept_routed, flips)


def _clone(sel: Selector) -> Selector:
    new = object.__new__(type(sel))
    new.__dict__.update({k: v for k, v in sel.__dict__.items() if not k.endswith("_")})
    return new
