"""Routing fingerprints: the router's softmax per token and layer, averaged per document
(for sigmoid routers, the choice scores normalised to sum 1: `modeling.layers.routing.Route.probs`).

The model runs *layer by layer* over the whole calibration set: the hidden
states of every document stay in memory, each layer's weights are touched
once (for all documents) and their mapped pages are dropped before the next
layer, so a checkpoint larger than RAM can be fingerprinted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from modeling import Batch, KVCache, Model, ProfileManifest
from modeling.io.safetensors_io import make_parents, remove_created
from modeling.layers.routing import expert_group

from .errors import SubsetError

FORMAT = "emo-subset-fingerprints/1"


# -- the expert layout of a model, in original ids -----------------------------


@dataclass
class Layout:
    num_layers: int
    top_k: int
    num_original: list[int]  # original experts per layer (0: dense)
    loaded: list[list[int]]  # original ids the model holds, per layer
    shared: list[list[int]]  # original ids of its shared experts (inside the router), per layer
    n_group: int = 1  # group-limited routers: experts e of a layer with E form groups e // (E / n_group)
    topk_group: int = 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, n in enumerate(self.num_original) if n and self.loaded[i]]

    @property
    def width(self) -> int:
        return max(self.num_original, default=0)

    def group_of(self, layer: int, expert: int) -> int:
        return expert_group(expert, self.num_original[layer], self.n_group)

    @classmethod
    def of(cls, model: Model) -> "Layout":
        cfg = model.config
        if (model.path / "profile.json").is_file():
            num_original = list(ProfileManifest.read(model.path).num_experts_original)
        else:
            num_original = list(cfg.experts_per_layer)
        loaded, shared = [], []
        for i in range(cfg.num_layers):
            le = model.layer_experts(i)
            ids = [] if le is None else list(le.ids)
            loaded.append(ids)
            shared.append([] if le is None else [o for o, s in zip(le.ids, le.shared) if s])
        return cls(cfg.num_layers, cfg.top_k, num_original, loaded, shared, cfg.routing.n_group, cfg.routing.topk_group)

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "top_k": self.top_k, "num_original": self.num_original,
                "loaded": self.loaded, "shared": self.shared, "n_group": self.n_group, "topk_group": self.topk_group}


# -- the layer-by-layer pass ----------------------------------------------------


class LayerObserver:
    """Receives, per MoE layer and chunk of documents, the MoE input `h` and the
    residual `x`; may then restrict the layer's routing for what follows."""

    def observe(self, layer: int, le, h: torch.Tensor, x: torch.Tensor, docs: list[int], counts: list[int]) -> None:
        pass

    def mask(self, layer: int, le) -> torch.Tensor | None:  # [S] bool over slots, or None
        return None


def chunk_documents(token_lists: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    chunks, cur, n = [], [], 0
    for d, t in enumerate(token_lists):
        if cur and n + len(t) > max_batch_tokens:
            chunks.append(cur)
            cur, n = [], 0
        cur.append(d)
        n += len(t)
    if cur:
        chunks.append(cur)
    return chunks


class LayerPass:
    """Runs `model` over documents one layer at a time (all documents per layer)."""

    def __init__(self, model: Model, max_batch_tokens: int = 16384, release: bool = True, progress: bool = False,
                 desc: str = "layers"):
        self.model, self.max_batch_tokens, self.release = model, max_batch_tokens, release
        self.progress, self.desc = progress, desc

    @torch.inference_mode()
    def run(self, token_lists: list[list[int]], observer: LayerObserver) -> None:
        m = self.model
        cfg, tr, w = m.config, m.transformer, m.weights
        for t in token_lists:
            m.check_tokens(t)
        chunks = chunk_documents(token_lists, self.max_batch_tokens)
        state = []  # per chunk: batch, cos, sin, x
        for docs in chunks:
            counts = [len(token_lists[d]) for d in docs]
            tokens = torch.tensor([t for d in docs for t in token_lists[d]], dtype=torch.long)
            batch = Batch(tokens, list(range(len(docs))), [0] * len(docs), counts, [])
            x, cos, sin = tr.embed(batch)
            state.append([batch, cos, sin, x, docs])
        if self.release:
            m.files.release()
        bar = tqdm(total=cfg.num_layers, desc=self.desc, disable=not self.progress, unit="layer", leave=False)
        for i, lw in enumerate(w.layers):
            hs = []
            for st in state:
                batch, cos, sin, x, docs = st
                cache = KVCache(cfg, batch.num_seqs, max(batch.counts), x.dtype, x.device, layers=[i])
                x = tr.attention_block(i, x, cos, sin, batch, cache)
                st[3] = x
                h = tr.mlp_input(i, x)
                if lw.experts is not None:
                    observer.observe(i, lw.experts, h, x, docs, batch.counts)
                hs.append(h)
            mask = observer.mask(i, lw.experts) if lw.experts is not None else None
            for st, h in zip(state, hs):
                allowed = None
                if mask is not None and lw.experts is not None:
                    allowed = mask.to(m.device).unsqueeze(0).expand(h.shape[0], -1)
                st[3], _ = tr.mlp_block(i, st[3], allowed, h=h)
            del hs
            if self.release:
                m.files.release()
            bar.update(1)
        bar.close()



# -- fingerprints -----------------------------------------------------------------


@dataclass
class Fingerprints:
    """Per document: mean routing softmax [L, E] and top-k frequency [L, E], in
    original expert ids (columns of experts a profile lacks stay 0)."""

    probs: np.ndarray  # [N, L, E] float32
    topk_freq: np.ndarray  # [N, L, E] float32
    tokens: np.ndarray  # [N] int64
    labels: list[str]  # "" where unlabelled
    texts: list[str]
    layout: Layout
    model: dict[str, Any] = field(default_factory=dict)  # base identity and path

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, idx) -> "Fingerprints":
        idx = np.asarray(idx, dtype=np.int64)
        return Fingerprints(self.probs[idx], self.topk_freq[idx], self.tokens[idx], [self.labels[i] for i in idx],
                            [self.texts[i] for i in idx], self.layout, dict(self.model))

    def token_mean(self) -> np.ndarray:
        """[L, E] routing softmax averaged over every calibration token."""
        w = self.tokens.astype(np.float64)
        return (np.einsum("nle,n->le", self.probs.astype(np.float64), w) / w.sum()).astype(np.float32)

    def centroid(self) -> np.ndarray:
        """[L, E] mean of the per-document fingerprints."""
        return self.probs.mean(axis=0)

    def vectors(self) -> np.ndarray:
        """[N, sum of experts over MoE layers]: what clustering looks at."""
        return np.concatenate([self.probs[:, i, : self.layout.num_original[i]] for i in self.layout.moe_layers], axis=1)

    def calibration(self) -> dict[str, Any]:
        doms = sorted({lab for lab in self.labels if lab})
        return {"documents": int(len(self)), "tokens": int(self.tokens.sum()), "domains": doms}

    # -- files ------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"format": FORMAT, "labels": self.labels, "texts": self.texts, "layout": self.layout.to_dict(),
                "model": self.model}
        created = make_parents(path.parent)
        # written beside its final name and renamed: a reader never sees half a file, and a
        # failure (disk full, interrupt) removes the partial file and the folders made for it
        tmp = path.with_name(f".{path.name}.tmp.npz")
        try:
            np.savez_compressed(tmp, probs=self.probs, topk_freq=self.topk_freq, tokens=self.tokens,
                                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            remove_created(created)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Fingerprints":
        path = Path(path)
        if not path.is_file() and Path(str(path) + ".npz").is_file():
            path = Path(str(path) + ".npz")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != FORMAT:
                    raise SubsetError(f"{path}: not an emo-subset fingerprint file (format {meta.get('format')!r})")
                return cls(z["probs"], z["topk_freq"], z["tokens"], meta["labels"], meta["texts"],
                           Layout(**meta["layout"]), meta.get("model") or {})
        except SubsetError:
            raise
        except FileNotFoundError:
            raise SubsetError(f"{path}: no such fingerprint file") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SubsetError(f"{path}: not a readable fingerprint file ({type(e).__name__}: {e})") from None


class _Collector(LayerObserver):
    def __init__(self, model: Model, layout: Layout, n_docs: int):
        self.model, self.layout = model, layout
        L, E = layout.num_layers, layout.width
        self.probs = np.zeros((n_docs, L, E), np.float32)
        self.topk = np.zeros((n_docs, L, E), np.float32)

    def observe(self, i, le, h, x, docs, counts):
        r = self.model.transformer.route(i, h)
        T, S = r.probs.shape
        doc_of = torch.arange(len(docs)).repeat_interleave(torch.tensor(counts)).to(h.device)
        n = torch.tensor(counts, dtype=torch.float32, device=h.device)[:, None]
        psum = torch.zeros(len(docs), S, device=h.device).index_add_(0, doc_of, r.probs)
        hits = torch.zeros(T, S, device=h.device).scatter_(1, r.indices, r.valid.float())
        ksum = torch.zeros(len(docs), S, device=h.device).index_add_(0, doc_of, hits)
        cols = np.asarray(le.ids)
        self.probs[np.ix_(docs, [i], cols)] = (psum / n).cpu().numpy()[:, None, :]
        self.topk[np.ix_(docs, [i], cols)] = (ksum / n).cpu().numpy()[:, None, :]


class Fingerprinter:
    """`Fingerprinter(model).fit(documents)` -> `.fingerprints_`."""

    def __init__(self, model: Model, max_tokens: int = 512, max_batch_tokens: int = 16384, progress: bool = False):
        self.model, self.max_tokens, self.max_batch_tokens, self.progress = model, max_tokens, max_batch_tokens, progress

    def fit(self, documents, token_lists: list[list[int]] | None = None) -> "Fingerprinter":
        from .corpus import tokenize

        if token_lists is None:
            limit = min(self.max_tokens, self.model.config.max_position_embeddings)
            documents, token_lists = tokenize(documents, self.model.tokenizer, limit)
        layout = Layout.of(self.model)
        if not layout.moe_layers:
            raise SubsetError(f"{self.model.path}: the model has no mixture-of-experts layer")
        col = _Collector(self.model, layout, len(token_lists))
        LayerPass(self.model, self.max_batch_tokens, progress=self.progress, desc="fingerprint").run(token_lists, col)
        self.token_lists_ = token_lists
        self.fingerprints_ = Fingerprints(
            col.probs, col.topk, np.array([len(t) for t in token_lists], dtype=np.int64),
            [d.domain or "" for d in documents], [d.text[:20000] for d in documents], layout,
            {"identity": self.model.identity, "path": str(self.model.path)})
        return self

    def transform(self, documents) -> Fingerprints:
        return self.fit(documents).fingerprints_
