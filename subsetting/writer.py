"""Writes a profile: a standalone pruned checkpoint + profile.json, streamed from
views of the mapped source (one shard of pages resident at a time), into a
temporary folder renamed at the end."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from modeling import Model, ProfileManifest, load_config
from modeling.safetensors_io import AtomicFolder, CheckpointFiles, ShardedWriter, sha256_file
from modeling.profile import shard_files

from .errors import SubsetError
from .fingerprint import Layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _validate(kept: dict[int, list[int]], layout: Layout) -> None:
    for i in layout.moe_layers:
        if i not in kept:
            raise SubsetError(f"no experts chosen for layer {i}")
        ids = kept[i]
        loaded = set(layout.loaded[i])
        bad = [e for e in ids if e not in loaded]
        if bad:
            raise SubsetError(f"layer {i}: expert {bad[0]} is not in the model (out of range)")
        if len(set(ids)) != len(ids):
            raise SubsetError(f"layer {i}: an expert is listed twice")
        if len(ids) < min(layout.top_k, layout.num_original[i]):
            raise SubsetError(f"layer {i}: {len(ids)} experts kept, fewer than top-k {layout.top_k}")
        if any(s not in ids for s in layout.shared[i]):
            raise SubsetError(f"layer {i}: a shared expert is left out")


class _Plan:
    """(output name, source view) in writing order, and output name -> source names."""

    def __init__(self, model: Model, slots: dict[int, list[int]]):
        self.model, self.slots = model, slots
        self.files: CheckpointFiles = model.files
        self.names = model.config.names
        self.sources: dict[str, list[str]] = {}
        self.expert_bytes = 0
        self.non_expert_bytes = 0

    def _emit(self, out: str, t: torch.Tensor, src: list[str], expert: bool):
        self.sources[out] = src
        nb = t.numel() * t.element_size()
        if expert:
            self.expert_bytes += nb
        else:
            self.non_expert_bytes += nb
        return out, t

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg, f, n = self.model.config, self.files, self.names
        all_names = f.names()
        per_layer: dict[int, list[str]] = {i: [] for i in range(cfg.num_layers)}
        top: list[str] = []
        for name in all_names:
            for i in range(cfg.num_layers):
                if name.startswith(n.layer(i) + "."):
                    per_layer[i].append(name)
                    break
            else:
                top.append(name)
        first = [x for x in top if x == n.embed]
        last = [x for x in top if x != n.embed]
        for name in first:
            yield self._emit(name, f.get(name), [name], False)
        for i in range(cfg.num_layers):
            E = cfg.experts_per_layer[i]
            expert_names = {n.router(i), n.fused_gate_up(i), n.fused_down(i)}
            for j in range(E):
                expert_names.update(n.expert_tensor_names(i, j))
            for name in per_layer[i]:
                if name not in expert_names:
                    yield self._emit(name, f.get(name), [name], False)
            if E == 0:
                continue
            kept = self.slots[i]
            router = f.get(n.router(i))
            yield self._emit(n.router(i), router[torch.tensor(kept)].clone(), [n.router(i)], False)
            I = cfg.intermediate_size
            for new, j in enumerate(kept):
                per = n.expert_tensor_names(i, j)
                outs = n.expert_tensor_names(i, new)
                if per[0] in f:
                    for o, s in zip(outs, per):
                        yield self._emit(o, f.get(s), [s], True)
                else:  # fused source layout: written out per expert
                    gu_name, d_name = n.fused_gate_up(i), n.fused_down(i)
                    if gu_name not in f or d_name not in f:
                        raise SubsetError(f"{f.folder}: tensor {per[0]!r} (or fused {gu_name!r}) is missing")
                    gu = f.get(gu_name)[j]
                    yield self._emit(outs[0], gu[:I], [gu_name], True)
                    yield self._emit(outs[1], gu[I:], [gu_name], True)
                    yield self._emit(outs[2], f.get(d_name)[j], [d_name], True)
        for name in last:
            yield self._emit(name, f.get(name), [name], False)


def write_profile(model: Model, out: str | Path, name: str, kept: dict[int, list[int]], *,
                  selection: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                  coverage: dict[int, float] | None = None, centroid: np.ndarray | None = None,
                  max_shard_bytes: int = 2 * 1000**3, force: bool = False, progress: bool = False) -> ProfileManifest:
    """Write the profile folder `out` keeping `kept` ({layer: original ids}) of `model`."""
    layout = Layout.of(model)
    _validate(kept, layout)
    slots = {i: [model.layer_experts(i).ids.index(e) for e in sorted(ids)] for i, ids in kept.items()}
    cfg = model.config
    config = cfg.pruned_dict(slots)
    plan = _Plan(model, slots)
    files = model.files
    bar = tqdm(total=None, desc=f"write {name}", unit="B", unit_scale=True, disable=not progress, leave=False)

    def on_flush(names: list[str]) -> None:
        src = {s for o in names for s in plan.sources.get(o, [])}
        files.release(sorted(src))
        bar.update(sum(files.info(s).nbytes for s in src))

    with AtomicFolder(out, force=force) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes, on_flush)
        for oname, t in plan.tensors():
            writer.add(oname, t)
        hashes = writer.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in TOKENIZER_FILES:
            if (model.path / fname).is_file():
                shutil.copyfile(model.path / fname, tmp / fname)
        cent = None
        if centroid is not None:
            cent = [[round(float(v), 7) for v in centroid[i, : layout.num_original[i]]] for i in range(cfg.num_layers)]
        manifest = ProfileManifest(
            name=name,
            base=dict(model.identity),
            kept_experts={i: sorted(ids) for i, ids in sorted(kept.items())},
            num_experts_original=list(layout.num_original),
            selection=selection or {},
            calibration=calibration or {},
            coverage={i: round(float(c), 6) for i, c in (coverage or {}).items()},
            centroid=cent,
            bytes={"total": plan.expert_bytes + plan.non_expert_bytes, "experts": plan.expert_bytes,
                   "non_expert": plan.non_expert_bytes},
            shards=hashes,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.write(tmp)
        load_config(tmp)  # what we wrote must parse
        CheckpointFiles(tmp)
    bar.close()
    return manifest


def verify_profile(folder: str | Path, progress: bool = False) -> dict[str, Any]:
    """Recompute every shard's sha256 against profile.json. Returns {ok, shards: {file: ok}, problems}."""
    folder = Path(folder)
    m = ProfileManifest.read(folder)
    problems, result = [], {}
    try:
        on_disk = shard_files(folder)
    except (OSError, ValueError, KeyError) as e:
        raise SubsetError(f"{folder}: cannot read the shard index ({e})") from None
    for f in sorted(set(on_disk) - set(m.shards)):
        problems.append(f"{f}: shard not listed in profile.json")
    for f, sha in tqdm(sorted(m.shards.items()), desc="verify", disable=not progress, leave=False):
        p = folder / f
        if not p.is_file():
            problems.append(f"{f}: missing")
            result[f] = False
            continue
        ok = sha256_file(p) == sha
        result[f] = ok
        if not ok:
            problems.append(f"{f}: sha256 differs from profile.json")
    return {"profile": str(folder), "ok": not problems, "shards": result, "problems": problems}
