"""Attention kinds: one module class per kind, chosen per layer by the family.

A family declares each layer's kind in `ModelConfig.layer_types` (transformers'
own `layer_types` words: "full_attention", "sliding_attention", ...);
`ATTENTION_KINDS` maps a kind to its `Attention` subclass. A module knows, for
its one layer:

- `specs(names)`: the tensors it reads (checkpoint name, shape). `read` turns
  them into an `AttentionWeights`; everything that walks a model's tensors
  (`Model.non_expert_bytes`, `Model.pin`, GGUF export) walks
  `AttentionWeights.named_tensors()`, never fixed fields;
- `new_state` / `state_bytes`: its per-layer cache (`modeling.layers.cache`), which
  the engine's slots, ragged batches and the layer-at-a-time builder hold
  without knowing what is inside;
- `forward`: its output `[T, H]` for normed hidden states of a packed, ragged
  `Batch`, writing its state for every sequence of the batch.

Every dense product, norm and single-query attention goes through the
`LayerOps` it is given (the model's `Kernels`: native CPU kernels, int8), so
the kernels serve every kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import KVState, LayerState
from .blocks import apply_rope

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import Batch
    from ..names import TensorNames



@dataclass(frozen=True)
class LayerOps:
    """What a module computes with: the model's kernels (`modeling.kernels.Kernels`)."""

    linear: Callable[..., Tensor]  # (x, weight, bias=None) -> x @ weight.T + bias, any weight format
    norm: Callable[[Tensor, Tensor], Tensor]  # (x, weight) -> RMSNorm(x) * weight, the model's eps
    # (q [heads, D], keys [kv_heads, L, D], values [kv_heads, L, D], sinks, scale) -> [heads, D] float32,
    # or None where the native kernel does not apply (the caller runs `decode_attention`)
    attend_decode: Callable[..., Tensor | None]
    rope: Callable[[Tensor, Tensor, Tensor], Tensor] = apply_rope  # (x, cos, sin) -> blocks.apply_rope's result
    # (x, weights, biases) -> [linear(x, w, b) ...] in one call (None: `linear` for each)
    linear_many: Callable[..., list[Tensor]] | None = None

    def linears(self, x: Tensor, weights, biases) -> list[Tensor]:
        """Several products of one input (q, k and v): one call where the kernels take them together."""
        if self.linear_many is None:
            return [self.linear(x, w, b) for w, b in zip(weights, biases)]
        return self.linear_many(x, weights, biases)


@dataclass(frozen=True)
class TensorSpec:
    role: str  # the module's name for it (q, k, kv_a, ...)
    name: str  # the checkpoint's name
    shape: tuple[int, ...]


class AttentionWeights:
    """One layer's attention tensors by role, with their checkpoint names. A role
    the module declares but the config leaves out (a bias, a norm) reads as None."""

    def __init__(self, roles: tuple[str, ...]):
        object.__setattr__(self, "_roles", roles)
        object.__setattr__(self, "_tensors", {})
        object.__setattr__(self, "_names", {})

    def add(self, spec: TensorSpec, t) -> None:
        self._tensors[spec.role] = t
        self._names[spec.role] = spec.name

    def __getattr__(self, role: str):
        if role in self._roles:
            return self._tensors.get(role)
        raise AttributeError(role)

    def __setattr__(self, role: str, t) -> None:  # a test swaps a tensor (sinks) in place
        if role not in self._tensors:
            raise AttributeError(f"no attention tensor {role!r} in this layer")
        self._tensors[role] = t

    def named_tensors(self) -> list[tuple[str, object]]:
        """(checkpoint name, tensor or PackedLinear) of every tensor read, in `specs` order."""
        return [(self._names[r], t) for r, t in self._tensors.items()]


class Attention:
    """One attention kind of one layer. Subclass it for a new kind, list the
    tensors in `specs`, and register it in `ATTENTION_KINDS` under the
    layer-type words that select it."""

    roles: tuple[str, ...] = ()
    rope_dim: int | None = None  # the width its RoPE tables are computed for (None: no RoPE)

    def __init__(self, cfg: ModelConfig, layer: int):
        self.cfg, self.layer = cfg, layer

    def specs(self, names: TensorNames) -> list[TensorSpec]:
        raise NotImplementedError

    def read(self, reader, names: TensorNames) -> AttentionWeights:
        """Views of this layer's tensors, shapes checked (`weights._Reader.get`)."""
        w = AttentionWeights(self.roles)
        for s in self.specs(names):
            w.add(s, reader.get(s.name, s.shape))
        return w

    def new_state(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> LayerState:
        raise NotImplementedError

    def state_bytes(self, num_slots: int, max_len: int, itemsize: int) -> int:
        raise NotImplementedError

    def forward(self, w: AttentionWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch, state: LayerState,
                ops: LayerOps) -> Tensor:
        raise NotImplementedError


class GroupedQueryAttention(Attention):
    """Multi-head attention with grouped kv heads (GQA) and today's options: q/k
    RMSNorm over the whole projection (OLMoE) or per head (Qwen3, GLM), q/k/v and
    o biases, clipped q/k/v, attention sinks (gpt-oss) and a sliding window
    ("sliding_attention" layers: a ring-buffer `KVState` of the window)."""

    roles = ("q", "k", "v", "o", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias", "o_bias", "sinks")

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.sliding_windows[layer]
        self.rope_dim = cfg.head_dim

    def specs(self, names: TensorNames) -> list[TensorSpec]:
        cfg, i = self.cfg, self.layer
        H, qd, kvd = cfg.hidden_size, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [TensorSpec(p, names.proj(i, p), shape) for p, shape in
               (("q", (qd, H)), ("k", (kvd, H)), ("v", (kvd, H)), ("o", (H, qd)))]
        if cfg.qk_norm is not None:  # "proj": over the whole projection; "head": one [head_dim] weight
            qs, ks = ((qd,), (kvd,)) if cfg.qk_norm == "proj" else ((self.head_dim,), (self.head_dim,))
            out += [TensorSpec("q_norm", names.qk_norm(i, "q"), qs), TensorSpec("k_norm", names.qk_norm(i, "k"), ks)]
        if cfg.attention_bias:
            out += [TensorSpec(f"{p}_bias", names.proj(i, p, "bias"), s) for p, s in
                    (("q", (qd,)), ("k", (kvd,)), ("v", (kvd,)))]
        if cfg.o_bias:
            out.append(TensorSpec("o_bias", names.proj(i, "o", "bias"), (H,)))
        if cfg.attention_sinks:
            out.append(TensorSpec("sinks", names.sinks(i), (self.heads,)))
        return out

    def _positions(self, max_len: int) -> int:
        return max_len if self.window is None else min(self.window, max_len)

    def new_state(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> KVState:
        D = self.head_dim
        return KVState(num_slots, self.kv_heads, self._positions(max_len), D, D, dtype, device)

    def state_bytes(self, num_slots: int, max_len: int, itemsize: int) -> int:
        return num_slots * 2 * self.kv_heads * self.head_dim * itemsize * self._positions(max_len)

    def forward(self, w: AttentionWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch, state: KVState,
                ops: LayerOps) -> Tensor:
        cfg = self.cfg
        T, D = h.shape[0], self.head_dim
        linear, norm = ops.linear, ops.norm
        q, k, v = ops.linears(h, (w.q, w.k, w.v), (w.q_bias, w.k_bias, w.v_bias))
        if cfg.qk_norm == "proj":  # OLMoE: RMSNorm over the whole projection, before the head split
            q, k = norm(q, w.q_norm), norm(k, w.k_norm)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.heads, D)
        k = k.view(T, self.kv_heads, D)
        if cfg.qk_norm == "head":  # Qwen3, GLM: RMSNorm over head_dim, after the head split
            q, k = norm(q, w.q_norm), norm(k, w.k_norm)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [heads, T, D]
        v = v.view(T, self.kv_heads, D).transpose(0, 1)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        out = attend(q, k, v, batch, state, self.window, w.sinks, None, ops)
        return linear(out.transpose(0, 1).reshape(T, self.heads * D), w.o, w.o_bias)


def attend(q: Tensor, k: Tensor, v: Tensor, batch: Batch, state: KVState, window: int | None,
           sinks: Tensor | None, scale: float | None, ops: LayerOps) -> Tensor:
    """Causal attention of packed queries `[heads, T, Dk]` over each sequence's
    cache slot, after writing that sequence's keys `[kv_heads, T, Dk]` and values
    `[kv_heads, T, Dv]` into it. Returns `[heads, T, Dv]`. `scale` None: Dk ** -0.5."""
    if len(batch.slots) == 1 and batch.counts[0] == 1:  # one sequence's decode step: no output buffer to fill
        keys, vals, _ = state.write(batch.slots[0], batch.starts[0], k, v)
        return decode_one(q[:, 0], keys, vals, sinks, scale, ops).to(q.dtype)[:, None]
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    off = 0
    for slot, s, n in zip(batch.slots, batch.starts, batch.counts):
        keys, vals, first = state.write(slot, s, k[:, off:off + n], v[:, off:off + n])
        qs = q[:, off:off + n]
        if n == 1:  # every key the cache returns is visible to a single query
            out[:, off] = decode_one(qs[:, 0], keys, vals, sinks, scale, ops)
        else:
            out[:, off:off + n] = prefill_attention(qs, keys, vals, s, first, window, sinks, scale)
        off += n
    return out


def decode_one(q: Tensor, keys: Tensor, vals: Tensor, sinks: Tensor | None, scale: float | None,
               ops: LayerOps) -> Tensor:
    """One query per head against a slot: the native kernel where it applies (keys and values of one
    width), else `decode_attention`."""
    scale = keys.shape[-1] ** -0.5 if scale is None else scale
    o = ops.attend_decode(q, keys, vals, sinks, scale) if keys.shape[-1] == vals.shape[-1] else None
    return decode_attention(q, keys, vals, sinks, scale) if o is None else o


def decode_attention(q: Tensor, keys: Tensor, vals: Tensor, sinks: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """One query per head against a cache slot: q `[heads, D]`, keys/values
    `[kv_heads, L, D]` (strided views of the cache, read in place).

    Two small matmuls and a float32 softmax; for a single query this beats
    scaled_dot_product_attention on CPU, whose fallback copies the cached keys
    and values every step. Query heads are grouped over their kv head (GQA).
    `sinks` `[heads]` (gpt-oss): one more logit per head in the softmax, whose
    probability mass is dropped (it attends to nothing).
    """
    kvh, L, D = keys.shape
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(kvh, -1, D)  # [kv_heads, group, D]
    scores = torch.matmul(qg, keys.transpose(1, 2)).float() * scale  # [kv_heads, group, L]
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = _softmax_with_sink(scores, sinks.float().view(kvh, -1, 1))
    return torch.matmul(probs.to(vals.dtype), vals).reshape(-1, vals.shape[-1])


def _softmax_with_sink(scores: Tensor, sink: Tensor) -> Tensor:
    """softmax over [scores, sink] along the last dim, the sink's column dropped
    (as transformers' eager gpt-oss attention computes it)."""
    combined = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1)[..., :-1]


# Score elements per block of queries in the eager (sink) path: bounds its
# float32 [heads, rows, keys] scores at 64 MiB whatever the prompt length.
_EAGER_BLOCK = 1 << 24


def prefill_attention(q: Tensor, keys: Tensor, vals: Tensor, start: int, first: int, window: int | None,
                      sinks: Tensor | None, scale: float | None = None) -> Tensor:
    """Queries `[heads, n, D]` at positions start.. against keys `[kv_heads, L, D]`
    at positions first..: causal, and within `window` positions when the layer
    slides (a key at p is seen by queries at p .. p + window - 1, as transformers'
    sliding mask `kv > q - window`)."""
    h, n, D = q.shape
    kvh, L, _ = keys.shape
    scale = D ** -0.5 if scale is None else scale
    qpos = torch.arange(start, start + n, device=q.device)[:, None]
    kpos = torch.arange(first, first + L, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    if sinks is None:
        causal = start == 0 and first == 0 and (window is None or n <= window)  # the mask is plain causal
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=None if causal else mask,
                                              is_causal=causal, enable_gqa=kvh != h, scale=scale)
    Dv = vals.shape[-1]
    qg = q.reshape(kvh, h // kvh, n, D)
    sink = sinks.float().view(kvh, h // kvh, 1, 1)
    out = torch.empty(kvh, h // kvh, n, Dv, dtype=q.dtype, device=q.device)
    rows = max(1, _EAGER_BLOCK // (h * L))
    for r in range(0, n, rows):
        scores = torch.matmul(qg[:, :, r:r + rows], keys[:, None].transpose(-1, -2)).float() * scale
        scores = scores.masked_fill(~mask[r:r + rows], float("-inf"))
        probs = _softmax_with_sink(scores, sink)
        out[:, :, r:r + rows] = torch.matmul(probs.to(vals.dtype), vals[:, None])
    return out.reshape(h, n, Dv)


class MultiHeadLatentAttention(Attention):
    """DeepSeek's multi-head latent attention (MLA; DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash),
    as transformers' DeepseekV3Attention computes it.

    Queries come through a low-rank pair (`q_a_proj`, RMSNorm, `q_b_proj`) or one
    `q_proj` when `q_lora_rank` is None. Keys and values are compressed to a latent
    of `kv_lora_rank` (`kv_a_proj_with_mqa`, RMSNorm) plus one shared rotary key of
    `qk_rope_head_dim` (decoupled RoPE, interleaved pairs when `rope_interleave`).
    The cache keeps only that: latent and rotary key per position (a `KVState` of one
    "head", kv_lora_rank + qk_rope_head_dim wide), 576 values per position and layer for
    DeepSeek-V3 against 2 x 128 x 192 for the keys and values it expands to.
    `kv_b_proj` expands the cached latents to per-head keys (nope part) and values at
    attention time. The softmax scale is qk_head_dim ** -0.5, times mscale^2 for YaRN
    with `mscale_all_dim` (transformers' `yarn_apply_mscale`)."""

    roles = ("q", "q_a", "q_a_bias", "q_a_norm", "q_b", "kv_a", "kv_a_bias", "kv_a_norm", "kv_b", "o", "o_bias")

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        m = cfg.extra["mla"]
        self.heads = cfg.num_heads
        self.q_rank, self.kv_rank = m["q_lora_rank"], m["kv_lora_rank"]
        self.nope, self.rope, self.v_dim = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        self.interleave = m["rope_interleave"]
        self.rope_dim = m["rope_head_dim"]  # rope_tables(cfg.rope, rope_dim) rotates exactly qk_rope_head_dim dims
        self.scale = mla_softmax_scale(cfg, self.nope + self.rope)

    def specs(self, names: TensorNames) -> list[TensorSpec]:
        cfg, i, H, n = self.cfg, self.layer, self.cfg.hidden_size, self.heads
        bias = cfg.attention_bias
        out = []
        if self.q_rank is None:
            out.append(TensorSpec("q", names.mla(i, "q_proj"), (n * (self.nope + self.rope), H)))
        else:
            out += [TensorSpec("q_a", names.mla(i, "q_a_proj"), (self.q_rank, H))]
            out += [TensorSpec("q_a_bias", names.mla(i, "q_a_proj", "bias"), (self.q_rank,))] if bias else []
            out += [TensorSpec("q_a_norm", names.mla(i, "q_a_layernorm"), (self.q_rank,)),
                    TensorSpec("q_b", names.mla(i, "q_b_proj"), (n * (self.nope + self.rope), self.q_rank))]
        out += [TensorSpec("kv_a", names.mla(i, "kv_a_proj_with_mqa"), (self.kv_rank + self.rope, H))]
        out += [TensorSpec("kv_a_bias", names.mla(i, "kv_a_proj_with_mqa", "bias"), (self.kv_rank + self.rope,))] if bias else []
        out += [TensorSpec("kv_a_norm", names.mla(i, "kv_a_layernorm"), (self.kv_rank,)),
                TensorSpec("kv_b", names.mla(i, "kv_b_proj"), (n * (self.nope + self.v_dim), self.kv_rank)),
                TensorSpec("o", names.mla(i, "o_proj"), (H, n * self.v_dim))]
        out += [TensorSpec("o_bias", names.mla(i, "o_proj", "bias"), (H,))] if bias else []
        return out

    def read(self, reader, names: TensorNames) -> AttentionWeights:
        from ..io.safetensors_io import CheckpointError

        try:
            return super().read(reader, names)
        except CheckpointError as e:  # say which config keys the shapes come from
            raise CheckpointError(f"{e} (MLA: q_lora_rank {self.q_rank}, kv_lora_rank {self.kv_rank}, "
                                  f"qk_nope_head_dim {self.nope}, qk_rope_head_dim {self.rope}, "
                                  f"v_head_dim {self.v_dim}, {self.heads} heads)") from None

    def new_state(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> KVState:
        # "keys": the normed latent [1, L, kv_lora_rank]; "values": the rotated shared key [1, L, qk_rope_head_dim]
        return KVState(num_slots, 1, max_len, self.kv_rank, self.rope, dtype, device)

    def state_bytes(self, num_slots: int, max_len: int, itemsize: int) -> int:
        return num_slots * max_len * (self.kv_rank + self.rope) * itemsize

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if not self.interleave:
            return apply_rope(x, cos, sin)
        # DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... each rotated by one frequency; the
        # result is laid out de-interleaved, as transformers' apply_rotary_pos_emb_interleave
        half = cos.shape[-1] // 2
        c, s = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def forward(self, w: AttentionWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch, state: KVState,
                ops: LayerOps) -> Tensor:
        linear, norm = ops.linear, ops.norm
        T, n = h.shape[0], self.heads
        if self.q_rank is None:
            q = linear(h, w.q)
        else:
            q = linear(norm(linear(h, w.q_a, w.q_a_bias), w.q_a_norm), w.q_b)
        q = q.view(T, n, self.nope + self.rope).transpose(0, 1)  # [heads, T, qk_head_dim]
        q = torch.cat([q[..., :self.nope], self._rotate(q[..., self.nope:], cos, sin)], dim=-1)
        ckv = linear(h, w.kv_a, w.kv_a_bias)
        latent = norm(ckv[:, :self.kv_rank].contiguous(), w.kv_a_norm)[None]  # [1, T, kv_lora_rank]
        k_rot = self._rotate(ckv[None, :, self.kv_rank:], cos, sin)  # [1, T, qk_rope_head_dim]
        out = torch.empty(n, T, self.v_dim, dtype=q.dtype, device=q.device)
        off = 0
        for slot, s, m in zip(batch.slots, batch.starts, batch.counts):
            lat, rot, _ = state.write(slot, s, latent[:, off:off + m], k_rot[:, off:off + m])
            L = lat.shape[1]
            kv = linear(lat[0], w.kv_b).view(L, n, self.nope + self.v_dim).transpose(0, 1)  # [heads, L, .]
            keys = torch.cat([kv[..., :self.nope], rot.expand(n, L, self.rope)], dim=-1)
            vals = kv[..., self.nope:]
            qs = q[:, off:off + m]
            if m == 1:
                out[:, off] = decode_one(qs[:, 0], keys, vals, None, self.scale, ops)
            else:
                out[:, off:off + m] = prefill_attention(qs, keys, vals, s, 0, None, None, self.scale)
            off += m
        return linear(out.transpose(0, 1).reshape(T, n * self.v_dim), w.o, w.o_bias)


def mla_softmax_scale(cfg: ModelConfig, qk_head_dim: int) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
    scale = qk_head_dim ** -0.5
    p = cfg.rope.params
    if cfg.rope.type != "default" and p.get("mscale_all_dim"):
        factor = float(p["factor"])
        mscale = 0.1 * float(p["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale = scale * mscale * mscale
    return scale


# layer-type word -> module class. A new kind is one more entry (and its words in a family's layer_types).
ATTENTION_KINDS: dict[str, type[Attention]] = {
    "full_attention": GroupedQueryAttention,
    "sliding_attention": GroupedQueryAttention,
    "mla": MultiHeadLatentAttention,
}


from .gated_deltanet import GatedAttention, GatedDeltaNetAttention  # noqa: E402 (they subclass the above)

ATTENTION_KINDS.update({"gated_attention": GatedAttention, "linear_attention": GatedDeltaNetAttention})


def attention_modules(cfg: ModelConfig) -> list[Attention]:
    """The attention module of every layer, as `cfg.layer_types` declares them
    (config.py has refused words not in ATTENTION_KINDS)."""
    return [ATTENTION_KINDS[t](cfg, i) for i, t in enumerate(cfg.layer_types)]
