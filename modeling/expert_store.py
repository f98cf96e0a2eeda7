"""The expert store: one record per expert slot of every MoE layer, and what
changes them. A slot (`ExpertSlot`) holds everything it serves: the original
expert id, the checkpoint folder whose bytes serve it, the `Expert` (views of
its matrices, with their quantization), its router row, its correction-bias
and router-logit-bias entries, whether it is shared / always active, its
routing group, and whether its bytes are a repair (new bytes under a base id).

Each MoE layer's view (`LayerExperts`) keeps its slots sorted by original id
and the tables the forward pass reads, rebuilt from the records whenever they
change: `ids`, `experts`, `router`, `bias`, `logit_bias`, `shared_mask`,
`always_mask`, `group_ids`, `slot_of`. A slot that changes is REPLACED by a new
record (and a new `Expert` object when its bytes change), never mutated: the
kernels key what they prepared on the `Expert` object.

`ExpertStore` owns the mapped sources (checkpoint folders) and merging a
source's experts in, withdrawing a source (every slot it serves re-pointed at
once, router and bias entries with the matrices: nothing of a withdrawn file
keeps serving), bytes per expert and per source, and what pinning locks.
Reading a source's tensors stays the loader's (`read_layer`), which knows each
source's config and quantization.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .io.safetensors_io import CheckpointFiles
    from .io.weights import Expert


@dataclass(frozen=True, eq=False)  # compared by identity: a changed slot is a new record
class ExpertSlot:
    orig_id: int
    source: str  # the checkpoint folder whose bytes serve the slot
    expert: "Expert"
    router_row: Tensor  # [H]
    shared: bool = False
    always_active: bool = False
    group: int = 0  # routing group (group-limited routers)
    bias: Tensor | None = None  # e_score_correction_bias entry (sigmoid routers)
    logit_bias: Tensor | None = None  # gpt-oss router logit bias entry
    repaired: bool = False  # its bytes are a repair (profile.json "repair"), never the base's

    def nbytes(self) -> int:
        return self.expert.nbytes()

    def sourced(self) -> list[Tensor]:
        """Every tensor the slot reads from its source's bytes."""
        ts = [t for t in self.expert.tensors() if isinstance(t, Tensor)] + [self.router_row]
        return ts + [t for t in (self.bias, self.logit_bias) if t is not None]


class LayerExperts:
    """The experts one MoE layer has loaded: slot records sorted by original id,
    and the per-slot tables routing reads (rebuilt from the records)."""

    def __init__(self, slots: list[ExpertSlot], device: torch.device, router: Tensor | None = None):
        self.device = device
        self.slots = sorted(slots, key=lambda s: s.orig_id)
        self.rebuild(router)

    def rebuild(self, router: Tensor | None = None) -> None:
        """The tables, from the records. `router`: the checkpoint's own [S, H] view when
        the slots are exactly its rows in order (no copy); otherwise the one copy made."""
        sl, dev = self.slots, self.device
        self.ids = [s.orig_id for s in sl]
        self.experts = [s.expert for s in sl]
        self.sources = [s.source for s in sl]
        self.shared = [s.shared for s in sl]
        self._slot_of = {e: k for k, e in enumerate(self.ids)}
        self.router = router if router is not None else torch.stack([s.router_row for s in sl])
        self.shared_mask = torch.tensor(self.shared, dtype=torch.bool, device=dev)
        self.always_mask = torch.tensor([s.always_active for s in sl], dtype=torch.bool, device=dev)
        # whether any slot is shared / always active, known here so routing need not ask the masks each step
        self.any_shared, self.any_always = any(self.shared), any(s.always_active for s in sl)
        self.bias = torch.stack([s.bias for s in sl]).float() if sl and sl[0].bias is not None else None
        self.logit_bias = torch.stack([s.logit_bias for s in sl]) if sl and sl[0].logit_bias is not None else None
        self.group_ids = torch.tensor([s.group for s in sl], dtype=torch.int64, device=dev)

    def slot_of(self, orig_id: int) -> int | None:
        return self._slot_of.get(orig_id)

    def merge(self, source: "LayerExperts", take_over_from: str | None = None) -> list[int]:
        """Add the experts of `source` this layer lacks (by original id).

        An expert already present is kept as is: two checkpoints of the same base
        hold the same bytes for the same original id (the caller checks the base
        identity), so it exists once in memory. The exception is a slot served by
        `take_over_from` (the base checkpoint's folder): the source's own shards then
        serve that expert, and the base's copy is never touched. Returns the ids
        added or taken over."""
        added, slots = [], list(self.slots)
        for rec in source.slots:
            k = self.slot_of(rec.orig_id)
            if k is None:
                slots.append(rec)
            elif take_over_from is not None and slots[k].source == take_over_from:
                # the source's expert bytes; routing (router row, biases) stays the base's, as before
                slots[k] = dataclasses.replace(slots[k], expert=rec.expert, source=rec.source)
            else:
                continue
            added.append(rec.orig_id)
        if added:
            self.slots = sorted(slots, key=lambda s: s.orig_id)
            self.rebuild()  # the router over the union is small (S x H) and is the one copy made
        return added

    def take_slot(self, slot: int, rec: ExpertSlot) -> None:
        """Serve `slot` from `rec` (the same original expert in another mapped
        source): the whole record is replaced, never mutated. Call `rebuild` after
        the last one."""
        assert rec.orig_id == self.slots[slot].orig_id
        self.slots[slot] = rec


class ExpertStore:
    """The MoE layers' slots (`layers[i]`: a `LayerExperts`, None for a dense
    layer), the mapped sources they read, and what changes them."""

    def __init__(self, layers: list[LayerExperts | None], base: str, files: "CheckpointFiles",
                 read_layer: Callable[[str, int], LayerExperts | None]):
        self.layers = layers
        self.base = base  # the model's own checkpoint folder: never withdrawn
        self.sources: dict[str, CheckpointFiles] = {base: files}
        self.withdrawn: set[str] = set()  # sources whose bytes must no longer serve
        self._read_layer = read_layer  # (source folder, layer) -> that source's views of the layer's experts

    # -- changes ---------------------------------------------------------------
    def merge(self, source: str, take_over_from: str | None = None) -> dict[int, list[int]]:
        """Merge the experts of a mapped `source` into every MoE layer (see
        `LayerExperts.merge`). Returns {layer: ids added or taken over}."""
        added: dict[int, list[int]] = {}
        for i, le in enumerate(self.layers):
            if le is None:
                continue
            src = self._read_layer(source, i)
            if src is not None:
                added[i] = le.merge(src, take_over_from)
        return added

    def withdraw(self, source: str) -> dict[int, list[int]]:
        """Stop using the bytes of `source`: every slot it serves is replaced by the
        same expert's record in another source not withdrawn (the base first, then
        the others in the order they were added): expert, router row and bias
        entries at once. Returns {layer: original ids} no sound source holds (they
        keep the withdrawn bytes; callers must not route to them)."""
        if source == self.base:
            raise ValueError(f"{source}: the model's own checkpoint cannot be withdrawn")
        self.withdrawn.add(source)
        alternatives = [s for s in self.sources if s not in self.withdrawn]
        orphans: dict[int, list[int]] = {}
        for i, le in enumerate(self.layers):
            if le is None or source not in le.sources:
                continue
            wanted = {rec.orig_id for rec in le.slots if rec.source == source}
            for alt in alternatives:
                if not wanted:
                    break
                src = self._read_layer(alt, i)
                for rec in src.slots if src is not None else []:
                    if rec.orig_id in wanted:
                        le.take_slot(le.slot_of(rec.orig_id), rec)
                        wanted.discard(rec.orig_id)
            if wanted:
                orphans[i] = sorted(wanted)
            le.rebuild()
        return orphans

    # -- accounting --------------------------------------------------------------
    def expert_bytes(self, layer: int, orig_id: int) -> int:
        le = self.layers[layer]
        return le.slots[le.slot_of(orig_id)].nbytes()

    def bytes_by_source(self) -> dict[str, int]:
        """Expert bytes each source serves now (an expert shared by id counts once)."""
        out = {s: 0 for s in self.sources}
        for le in self.layers:
            for rec in le.slots if le is not None else []:
                out[rec.source] = out.get(rec.source, 0) + rec.nbytes()
        return out

    def pinned_matrices(self, pool: dict[int, list[int] | None] | None) -> list:
        """What serving `pool` ({layer: original ids}; None or a None entry: every
        loaded expert) reads of the experts: each layer's router and the matrices of
        its pool's experts (a fused gate_up view with the gate and up it spans)."""
        mats: list = []
        for i, le in enumerate(self.layers):
            if le is None:
                continue
            mats.append(le.router)
            ids = le.ids if pool is None or pool.get(i) is None else pool[i]
            for e in ids:
                ex = le.experts[le.slot_of(e)]
                mats += [ex.gate_up] if ex.gate_up is not None else []
                mats += ex.matrices()
        return mats
