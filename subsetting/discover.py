"""Finding domains in an unlabelled corpus: PCA of the routing fingerprints, L2
normalisation, spherical k-means; `k="auto"` picks K by silhouette (cosine)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
from .errors import SubsetError
from .fingerprint import Fingerprints

STOPWORDS = set("""the and for that with this from are was were have has had not but you your its his her
their they them then than there these those which what when where who will would can could should into
about over also been being more most such only other some any all one two may might must our out use used
self none true false return def int""".split())


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100):
    """Unit vectors x [N, D] -> (labels, unit centroids, objective = sum of cosine to own centroid)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        # k-means++ seeding on cosine distance
        c = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d = np.clip(1 - np.max(x @ np.array(c).T, axis=1), 0, None)
            p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
            c.append(x[rng.choice(len(x), p=p)])
        c = np.array(c)
        labels = None
        for _ in range(max_iter):
            new = np.argmax(x @ c.T, axis=1)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                c[j] = _normalise(members.sum(0, keepdims=True))[0] if len(members) else x[rng.integers(len(x))]
        obj = float(np.sum(np.max(x @ c.T, axis=1)))
        if best is None or obj > best[2]:
            best = (labels, c.copy(), obj)
    return best


class DomainDiscovery:
    """`DomainDiscovery(k).fit(fingerprints)` -> `labels_`, `k_`, `silhouettes_`."""

    def __init__(self, k: int | str = "auto", n_components: int = 32, seed: int = 0, k_max: int = 12):
        self.k, self.n_components, self.seed, self.k_max = k, n_components, seed, k_max

    def _embed(self, fp: Fingerprints) -> np.ndarray:
        from sklearn.decomposition import PCA

        x = fp.vectors().astype(np.float64)
        nc = max(1, min(self.n_components, x.shape[0] - 1, x.shape[1]))
        self.pca_ = PCA(n_components=nc, random_state=self.seed).fit(x)
        return _normalise(self.pca_.transform(x))

    def fit(self, fp: Fingerprints) -> "DomainDiscovery":
        from sklearn.metrics import silhouette_score

        n = len(fp)
        z = self._embed(fp)
        self.embedding_ = z
        self.silhouettes_: dict[int, float] = {}
        if self.k == "auto":
            ks = list(range(2, min(self.k_max, n - 1) + 1))
            if not ks:
                raise SubsetError(f"--k auto needs at least 3 documents (got {n})")
            fits = {}
            for k in ks:
                fits[k] = spherical_kmeans(z, k, self.seed)
                labels = fits[k][0]
                self.silhouettes_[k] = (float(silhouette_score(z, labels, metric="cosine"))
                                        if len(set(labels)) > 1 else -1.0)
            self.k_ = max(ks, key=lambda k: (self.silhouettes_[k], -k))
            self.labels_, self.centers_, _ = fits[self.k_]
        else:
            k = int(self.k)
            if k < 1 or k > n:
                raise SubsetError(f"--k {k}: needs 1 <= k <= number of documents ({n})")
            self.k_ = k
            self.labels_, self.centers_, _ = spherical_kmeans(z, k, self.seed)
            if 1 < k < n and len(set(self.labels_)) > 1:
                self.silhouettes_[k] = float(silhouette_score(z, self.labels_, metric="cosine"))
        return self

    def summary(self, fp: Fingerprints, words: int = 10, snippets: int = 3) -> dict[str, Any]:
        labels = self.labels_
        counts = []
        for j in range(self.k_):
            c = Counter()
            for i in np.flatnonzero(labels == j):
                c.update(w for w in re.findall(r"[a-z][a-z_]{2,}", fp.texts[i].lower()) if w not in STOPWORDS)
            counts.append(c)
        df = Counter(w for c in counts for w in c)  # in how many clusters a word occurs
        clusters = []
        for j in range(self.k_):
            idx = np.flatnonzero(labels == j)
            c = counts[j]
            score = {w: n * np.log(1 + self.k_ / df[w]) for w, n in c.items()}
            top = sorted(score, key=lambda w: -score[w])[:words]
            lab = Counter(fp.labels[i] for i in idx if fp.labels[i])
            clusters.append({
                "cluster": j, "size": int(len(idx)), "tokens": int(fp.tokens[idx].sum()), "top_words": top,
                "snippets": [" ".join(fp.texts[i].split())[:160] for i in idx[:snippets]],
                "labels": dict(lab.most_common()),
            })
        out: dict[str, Any] = {"k": int(self.k_), "documents": len(fp), "silhouette": self.silhouettes_,
                               "labels": [int(x) for x in labels], "clusters": clusters}
        if all(fp.labels) and len(set(fp.labels)) > 1:
            from sklearn.metrics import adjusted_rand_score

            out["adjusted_rand_index"] = float(adjusted_rand_score(fp.labels, labels))
        return out


def summary_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Discovered domains (k = {s['k']}, {s['documents']} documents)", ""]
    if "adjusted_rand_index" in s:
        lines += [f"Adjusted Rand index against the given labels: {s['adjusted_rand_index']:.3f}", ""]
    if s["silhouette"]:
        lines += ["Silhouette (cosine) per k: " + ", ".join(f"{k}: {v:.3f}" for k, v in s["silhouette"].items()), ""]
    for c in s["clusters"]:
        lines += [f"## Cluster {c['cluster']}: {c['size']} documents, {c['tokens']} tokens", "",
                  "Most distinctive words: " + ", ".join(c["top_words"])]
        if c["labels"]:
            lines.append("Given labels: " + ", ".join(f"{k} ({v})" for k, v in c["labels"].items()))
        lines.append("")
        lines += [f"> {t}" for t in c["snippets"]]
        lines.append("")
    return "\n".join(lines)
