"""Writes a profile: a standalone pruned checkpoint + profile.json, streamed from
views of the mapped source (one shard of pages resident at a time), into a
temporary folder renamed at the end."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from modeling import Model, ProfileManifest, load_config
from modeling.config import parse_dtype
from modeling.quant.fp8 import FP8_DTYPES, SCALE_SUFFIX
from modeling.io.safetensors_io import CheckpointFiles, write_checkpoint
from modeling.io.profile import file_hashes, verify_profile
from modeling.quant import WeightScheme, preset
from modeling.quant.quantize import ignore_list, is_quantized_linear, quantize_matrix
from modeling.io.weights import PROFILE_FILE

from .errors import SubsetError
from .fingerprint import Layout
from .select import validate_kept

DTYPE_CONFIG_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


class _Plan:
    """(output name, source view) in writing order, and output name -> source names.

    Output names are the family's own per-expert names (modeling.names), whatever
    layout the source holds; router rows and correction-bias entries are sliced
    to the kept experts, which are renumbered 0..n-1 in original order. Tensors
    of layers past num_hidden_layers (GLM's multi-token-prediction layer) are
    left out: their expert count would no longer match the config.
    """

    def __init__(self, model: Model, slots: dict[int, list[int]], save_dtype: torch.dtype | None = None,
                 quantize: WeightScheme | None = None, quantize_lm_head: bool = False,
                 overrides: dict[str, torch.Tensor] | None = None):
        self.model, self.slots, self.save_dtype = model, slots, save_dtype
        # repaired routers and experts, by output name: written instead of the source's bytes
        self.overrides = overrides or {}
        self.quantize, self.quantize_lm_head = quantize, quantize_lm_head
        self.files: CheckpointFiles = model.files
        self.names = model.config.names
        self.sources: dict[str, list[str]] = {}
        self.expert_bytes = 0
        self.non_expert_bytes = 0
        n = self.names
        # kept in their stored dtype: the correction bias decides expert choice (float32 in GLM's releases)
        self.keep_dtype = {n.router_bias(i) for i in range(model.config.num_layers)}
        self.mxfp4: list[str] = []  # MXFP4 tensors written (as stored in the base)

    def _emit(self, out: str, t: torch.Tensor, src: list[str], expert: bool):
        if self.save_dtype is not None and t.is_floating_point() and t.dtype != self.save_dtype \
                and out not in self.keep_dtype and t.dtype not in FP8_DTYPES and not out.endswith(SCALE_SUFFIX):
            # One tensor at a time, as the writer streams: peak memory is one shard's
            # worth of converted tensors, never a converted copy of the base.
            t = t.to(self.save_dtype)
        pieces = [(out, t)]
        if self.quantize is not None and is_quantized_linear(out, self.names, self.quantize_lm_head):
            pieces = quantize_matrix(out, t, self.quantize)  # packed values, scales (zero points), shape
        for o, x in pieces:
            self.sources[o] = src
            nb = x.numel() * x.element_size()
            if expert:
                self.expert_bytes += nb
            else:
                self.non_expert_bytes += nb
            yield o, x

    def _first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.files), None)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        cfg, f, n = self.model.config, self.files, self.names
        per_layer: dict[int, list[str]] = {i: [] for i in range(cfg.num_layers)}
        top: list[str] = []
        for name in f.names():
            i = n.layer_of(name)
            if i is not None:
                if i < cfg.num_layers:
                    per_layer[i].append(name)
                continue  # a layer the config does not have (GLM's MTP layer): left out
            if n.served(name):  # a vision tower, an MTP head: left out (profile.json says so)
                top.append(name)
        for name in (x for x in top if x == n.embed):
            yield from self._emit(name, f.get(name), [name], False)
        for i in range(cfg.num_layers):
            E = cfg.experts_per_layer[i]
            routed = n.routed_expert_tensors(i, E) if E else set()
            for name in per_layer[i]:
                if name not in routed:
                    yield from self._emit(name, f.get(name), [name], False)
            if E:
                yield from self._layer_experts(i)
        for name in (x for x in top if x != n.embed):
            yield from self._emit(name, f.get(name), [name], False)

    def _layer_experts(self, i: int) -> Iterator[tuple[str, torch.Tensor]]:
        cfg, f, n = self.model.config, self.files, self.names
        kept = self.slots[i]
        idx = torch.tensor(kept)
        if n.stacked_experts:  # gpt-oss: the family's own layout keeps experts stacked on dim 0
            yield from self._stacked(i, idx)
            return
        rname = self._first(n.router(i), n.fused_router(i))
        yield from self._emit(n.router(i), self._own(n.router(i), f.get(rname)[idx].clone()), [rname], False)
        bname = self._first(n.router_bias(i), n.fused_router_bias(i))
        if bname is not None:
            yield from self._emit(n.router_bias(i), f.get(bname)[idx].clone(), [bname], False)
        I = cfg.intermediate_size
        for new, j in enumerate(kept):
            per = n.expert_tensor_names(i, j)
            outs = n.expert_tensor_names(i, new)
            if per[0] in f:
                for o, src in zip(outs, per):
                    yield from self._emit(o, self._own(o, f.get(src)), [src], True)
                    if src + SCALE_SUFFIX in f:  # an FP8 expert: its block scales, as stored
                        yield from self._emit(o + SCALE_SUFFIX, f.get(src + SCALE_SUFFIX), [src + SCALE_SUFFIX], True)
            else:  # fused source layout: written out per expert
                gu_name, d_name = n.fused_gate_up(i), n.fused_down(i)
                if gu_name not in f or d_name not in f:
                    raise SubsetError(f"{f.folder}: tensor {per[0]!r} (or fused {gu_name!r}) is missing")
                gu = f.get(gu_name)[j]
                yield from self._emit(outs[0], self._own(outs[0], gu[:I]), [gu_name], True)
                yield from self._emit(outs[1], self._own(outs[1], gu[I:]), [gu_name], True)
                yield from self._emit(outs[2], self._own(outs[2], f.get(d_name)[j]), [d_name], True)

    def _own(self, out: str, source: torch.Tensor) -> torch.Tensor:
        """The repaired tensor `out` in the source's dtype, or the source's view when not repaired."""
        t = self.overrides.get(out)
        if t is None:
            return source
        if tuple(t.shape) != tuple(source.shape):
            raise SubsetError(f"repaired tensor {out} has shape {tuple(t.shape)}, the source {tuple(source.shape)}")
        return t.to(source.dtype).contiguous()


    def _stacked(self, i: int, idx: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Every per-expert tensor of layer i sliced to the kept experts along dim 0,
        in its stored dtype and layout: MXFP4 blocks and scales are the base's bytes."""
        f, n = self.files, self.names
        router = {n.router(i), n.router_logit_bias(i)}
        for name in sorted(x for x in n.routed_expert_tensors(i, 0) if x in f):
            if name.endswith(("_blocks", "_scales")):
                self.mxfp4.append(name)
            yield from self._emit(name, f.get(name)[idx].clone(), [name], name not in router)

def write_profile(model: Model, out: str | Path, name: str, kept: dict[int, list[int]], *,
                  selection: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                  coverage: dict[int, float] | None = None, centroid: np.ndarray | None = None,
                  max_shard_bytes: int = 2 * 1000**3, force: bool = False, progress: bool = False,
                  save_dtype: str | torch.dtype | None = None, quantize: str | WeightScheme | None = None,
                  quantize_lm_head: bool = False, overrides: dict[str, torch.Tensor] | None = None,
                  repair: dict[str, Any] | None = None) -> ProfileManifest:
    """Write the profile folder `out` keeping `kept` ({layer: original ids}) of `model`:
    `modeling.write_checkpoint` (atomic, streamed) plus profile.json. `save_dtype`
    (e.g. "bfloat16") stores floating tensors in that dtype, converted as they are written.
    `quantize` ("int8", "int4", "int4-zp" or a WeightScheme) stores the linear weights
    (attention, experts, dense MLPs; lm_head with `quantize_lm_head`) in the
    compressed-tensors pack-quantized layout, quantized one matrix at a time as
    the shards are written; router, norms and embeddings keep their dtype.
    `overrides` ({output tensor name: tensor}, from `training.repair`) replaces the
    kept routers and experts by repaired ones (written in the source's dtype), and
    `repair` (what was done, with what data and hyperparameters) goes to profile.json."""
    scheme = preset(quantize) if isinstance(quantize, str) else quantize
    if scheme is not None and model.config.raw.get("quantization_config") is not None:
        raise SubsetError(f"{model.path}: the model is already quantized")
    layout = Layout.of(model)
    kept = validate_kept(kept, layout)
    slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in kept.items()}
    cfg = model.config
    dtype = parse_dtype(save_dtype)
    if overrides and model.config.names.stacked_experts:
        raise SubsetError(f"{model.path}: repaired experts of a stacked-expert family cannot be written")
    plan = _Plan(model, slots, dtype, scheme, quantize_lm_head, overrides)
    config = cfg.pruned_dict(slots)
    if scheme is not None:
        config["quantization_config"] = scheme.quantization_config(ignore_list(cfg.names, quantize_lm_head))
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype" and "dtype" not in config:
                config[key] = DTYPE_CONFIG_NAMES[dtype]
    files = model.files
    bar = tqdm(total=None, desc=f"write {name}", unit="B", unit_scale=True, disable=not progress, leave=False)
    manifest = ProfileManifest(
        name=name,
        base=dict(model.identity),
        kept_experts=dict(sorted(kept.items())),
        num_experts_original=list(layout.num_original),
        selection=selection or {},
        calibration=calibration or {},
        coverage={i: round(float(c), 6) for i, c in (coverage or {}).items()},
        repair=repair or {},
        left_out={p: why for p, why in cfg.names.not_served if any(x.startswith(p) for x in model.files.names())},
        centroid=None if centroid is None else
        [[round(float(v), 7) for v in centroid[i, : layout.num_original[i]]] for i in range(cfg.num_layers)],
    )

    def on_flush(names: list[str]) -> None:
        src = {s for o in names for s in plan.sources.get(o, [])}
        files.release(sorted(src))

    def finish(tmp: Path, hashes: dict[str, str]) -> None:
        manifest.bytes = {"total": plan.expert_bytes + plan.non_expert_bytes, "experts": plan.expert_bytes,
                          "non_expert": plan.non_expert_bytes}
        manifest.shards = hashes
        if plan.mxfp4:
            manifest.quantization = {"experts": "mxfp4", "requantized": False, "tensors": plan.mxfp4}
        manifest.files = file_hashes(tmp, exclude=set(hashes))
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.write(tmp)
        load_config(tmp)  # what we wrote must parse
        CheckpointFiles(tmp)

    extra = {fname: model.path / fname for fname in TOKENIZER_FILES if (model.path / fname).is_file()}
    write_checkpoint(out, config, plan.tensors(), extra_files=extra, max_shard_bytes=max_shard_bytes,
                     force=force, on_flush=on_flush, finish=finish, on_write=bar.update)
    bar.close()
    return manifest


def verification_report(folder: str | Path, progress: bool = False) -> dict[str, Any]:
    """`modeling.io.profile.verify_profile` with a progress bar over the bytes hashed:
    the manifest's own hash, every shard's and every other file's sha256.
    Returns {profile, ok, shards: {file: ok}, files: {file: ok}, problems}."""
    folder = Path(folder)
    if not (folder / PROFILE_FILE).is_file():
        raise SubsetError(f"{folder}: no {PROFILE_FILE} (not a profile folder)")
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != PROFILE_FILE)
    with tqdm(total=total, desc=f"verify {folder.name}", unit="B", unit_scale=True, disable=not progress,
              leave=False) as bar:
        return verify_profile(folder, on_file=lambda _, n: bar.update(n)).to_dict()
