"""The cache of a forward pass: per-layer state, chosen by each layer's attention module.

`KVCache` is what the engine, ragged batches and the subset builder hold: `num_slots`
sequences, `lengths[slot]` positions written per slot, `max_len` positions at most, and
one `LayerState` per layer made by that layer's attention module
(`modeling.layers.attention.Attention.new_state`). The model never looks inside a state; the
module that made it does. Today's states: `KVState` (keys and values, a ring buffer for
sliding windows); an MLA module keeps a compressed latent, a linear-attention module a
recurrent state per slot. Memory is allocated up front with `torch.empty`, whose
untouched pages the OS does not back, so a large `max_len` costs only what is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..config import ModelConfig


class LayerState:
    """One layer's cache for every slot. Subclasses hold tensors `[slots, ...]`."""

    def tensors(self) -> list[Tensor]:
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVState(LayerState):
    """Keys and values `[slots, kv_heads, size, head_dim]` (value width may differ from
    the key's). A full-attention layer holds `max_len` positions; a sliding-window
    layer holds only its window (a ring: position p lives at p % window), since no
    later query can look further back."""

    def __init__(self, num_slots: int, kv_heads: int, size: int, k_dim: int, v_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.empty((num_slots, kv_heads, size, k_dim), dtype=dtype, device=device)
        self.v = torch.empty((num_slots, kv_heads, size, v_dim), dtype=dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v]

    def write(self, slot: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """Store `k`, `v` `[kv_heads, n, dim]` of positions start..start+n-1 and
        return what these n queries attend to: keys, values `[kv_heads, L, dim]`
        and the position of the first key (the keys are consecutive positions), or
        None when the keys are a wrapped ring of exactly the window a single query
        at `start` sees (every key visible, order irrelevant to attention).

        Full layers (and windowed ones not yet wrapped) return views of the cache;
        a multi-token write into a wrapped window returns the window before
        `start` followed by the new keys (the ring itself then keeps the last
        `window` positions).
        """
        kc, vc = self.k[slot], self.v[slot]
        n, size = k.shape[1], kc.shape[1]
        if start + n <= size:  # no wrap-around: contiguous, views of the cache
            kc[:, start:start + n] = k
            vc[:, start:start + n] = v
            return kc[:, :start + n], vc[:, :start + n], 0
        if n == 1:  # decode into a full ring: it holds exactly start-size+1 .. start
            kc[:, start % size] = k[:, 0]
            vc[:, start % size] = v[:, 0]
            return kc, vc, None
        old = min(start, size - 1)  # what the earliest new query still sees of the past
        idx = torch.arange(start - old, start, device=kc.device) % size
        keys, vals = torch.cat([kc[:, idx], k], 1), torch.cat([vc[:, idx], v], 1)
        m = min(n, size)
        pos = torch.arange(start + n - m, start + n, device=kc.device) % size
        kc[:, pos] = k[:, n - m:]
        vc[:, pos] = v[:, n - m:]
        return keys, vals, start - old


class KVCache:
    """Per-layer state for `num_slots` sequences of up to `max_len` positions.

    A sequence owns a slot for its life; `lengths[slot]` is how many positions it
    has written (the forward pass sets it). `layers` limits the cache to some
    layers (the subset builder's layer-at-a-time pass holds one). The name stays
    KVCache (public API); a layer's state is whatever its module keeps.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layers: list[int] | None = None):
        from .attention import attention_modules

        self.max_len = max_len
        self.num_slots = num_slots
        self.lengths = [0] * num_slots
        modules = attention_modules(cfg)
        self.states: dict[int, LayerState] = {
            i: modules[i].new_state(num_slots, max_len, dtype, device)
            for i in (range(cfg.num_layers) if layers is None else layers)}

    def __getitem__(self, layer: int) -> LayerState:
        return self.states[layer]

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """`KVState.write` of a KV layer (kept for callers that address the cache by layer)."""
        return self.states[layer].write(slot, start, k, v)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states.values())

    @classmethod
    def nbytes_for(cls, cfg: ModelConfig, num_slots: int, max_len: int, itemsize: int) -> int:
        """Bytes a cache of `num_slots` x `max_len` allocates (what deploy/memory_request.py
        sizes a container by): the sum of each layer module's `state_bytes`."""
        from .attention import attention_modules

        return sum(m.state_bytes(num_slots, max_len, itemsize) for m in attention_modules(cfg))
