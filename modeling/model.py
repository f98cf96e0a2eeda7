"""The forward pass of every family (modeling.families), in the spirit of gpt-fast: one readable file,
an explicit KV cache, no framework magic.

A batch is *packed*: the new tokens of every sequence are concatenated into
one `[T]` vector (as vLLM does), so prefill, decode and a mix of both run in the
same call and dense layers never compute on padding. Attention is the only
step that looks at sequences one at a time, each against its own cache slot.

Routing runs over the experts a layer has loaded (its *slots*); each sequence
brings a pool, resolved to a boolean mask over slots per layer, and the router
logits outside it are dropped before the softmax (`modeling.routing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig
from .layers import apply_rope, rope_tables
from .kernels import Kernels
from .mxfp4 import DequantCache, gemv as mxfp4_gemv
from .quant import Int8Cache, PackedLinear
from .routing import Route, route
from .weights import Expert, LayerWeights, ModelWeights

# A pool as users write it: {layer: [original expert ids]}; a missing layer or
# None means every loaded expert of that layer.
Pool = dict[int, list[int] | None]


class PoolError(ValueError):
    """A pool that names experts the model has not loaded."""


@dataclass
class ResolvedPool:
    """A pool as slot masks per layer (None: no restriction in that layer)."""

    masks: list[Tensor | None]
    pool: Pool | None = None


class KVCache:
    """Keys and values per layer, `[slots, kv_heads, size, head_dim]`; the cache owns
    its writes (`write`), in the manner of gpt-fast.

    A sequence owns a slot for its life; `lengths[slot]` is how many positions it
    has written. A full-attention layer holds `max_len` positions; a
    sliding-window layer holds only its window (a ring buffer of `window`
    positions: position p lives at p % window), since no later query can look
    further back. Memory is allocated up front with `torch.empty`, whose
    untouched pages the OS does not back, so a large `max_len` costs only what is
    written. `layers` limits the cache to some layers (the subset builder's
    layer-at-a-time pass holds one).
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", layers: list[int] | None = None):
        self.max_len = max_len
        self.num_slots = num_slots
        self.lengths = [0] * num_slots
        self.windows = list(cfg.sliding_windows)
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        sizes = self.positions(cfg, max_len)
        for i in range(cfg.num_layers) if layers is None else layers:
            shape = (num_slots, cfg.num_kv_heads, sizes[i], cfg.head_dim)
            self.k[i] = torch.empty(shape, dtype=dtype, device=device)
            self.v[i] = torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def positions(cfg: ModelConfig, max_len: int) -> list[int]:
        """Positions each layer holds per slot: `max_len`, or a sliding window's size."""
        return [max_len if w is None else min(w, max_len) for w in cfg.sliding_windows]

    @classmethod
    def nbytes_for(cls, cfg: ModelConfig, num_slots: int, max_len: int, itemsize: int) -> int:
        """Bytes a cache of `num_slots` x `max_len` allocates for keys and values
        (what deploy/memory_request.py sizes a container by)."""
        per_position = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
        return num_slots * per_position * sum(cls.positions(cfg, max_len))

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int | None]:
        """Store `k`, `v` `[kv_heads, n, head_dim]` of positions start..start+n-1 and
        return what these n queries attend to: keys, values `[kv_heads, L, head_dim]`
        and the position of the first key (the keys are consecutive positions), or
        None when the keys are a wrapped ring of exactly the window a single query
        at `start` sees (every key visible, order irrelevant to attention).

        Full layers (and windowed ones not yet wrapped) return views of the cache;
        a multi-token write into a wrapped window returns the window before
        `start` followed by the new keys (the ring itself then keeps the last
        `window` positions).
        """
        kc, vc = self.k[layer][slot], self.v[layer][slot]
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


@dataclass
class Batch:
    """New tokens of several sequences, packed.

    tokens: `[T]` int64, the new tokens of sequence 0, then 1, ...
    slots: cache slot per sequence; starts: position of each sequence's first
    new token (= tokens already in its cache); counts: new tokens per sequence;
    pools: a ResolvedPool per sequence (None: every loaded expert).
    """

    tokens: Tensor
    slots: list[int]
    starts: list[int]
    counts: list[int]
    pools: list[ResolvedPool | None] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.slots)


@dataclass
class ChosenExperts:
    """What one MoE layer of a forward pass chose, per packed token (`collect_routes`)."""

    experts: Tensor  # [T, k] int64 original expert ids; -1 where the pool had fewer than k experts
    weights: Tensor  # [T, k] float32 routing weights the expert outputs were summed with (0 where -1)
    probs: Tensor  # [T, S] float32 routing softmax over the layer's loaded slots (`Route.probs`)


@dataclass
class ForwardOutput:
    logits: Tensor  # float32, rows as asked by `logits_at`
    router_probs: list[Tensor | None] | None = None  # per layer [T, S] float32 (None for dense layers)
    routes: list[ChosenExperts | None] | None = None  # per layer, with `collect_routes` (None for dense layers)


class Transformer:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, dtype: torch.dtype, device: torch.device,
                 int8: Int8Cache | None = None, compile_decode: bool = False):
        self.cfg, self.w, self.dtype, self.device = cfg, weights, dtype, device
        self.int8 = int8  # weight-only int8 for every matrix but the router (optional, lazy)
        self.compile_decode = compile_decode  # compiled bf16 GEMV for one-row products (optional)
        self.mxfp4_cache: DequantCache | None = None  # dequantized MXFP4 experts kept (optional, bounded)
        # one kernel object per weight matrix and the fused MoE call (modeling.kernels)
        self.kernels = Kernels(device, int8, compile_decode)

    def _linear(self, x: Tensor, w: Tensor | PackedLinear, bias: Tensor | None = None) -> Tensor:
        return self.kernels.linear(x, w, bias)

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.kernels.rms_norm(x, weight, self.cfg.rms_norm_eps)

    # -- pools -----------------------------------------------------------------
    def resolve_pool(self, pool: Pool | None) -> ResolvedPool:
        masks: list[Tensor | None] = []
        for i, lw in enumerate(self.w.layers):
            ids = None if pool is None else pool.get(i, pool.get(str(i)) if isinstance(pool, dict) else None)
            if ids is None or lw.experts is None:
                masks.append(None)
                continue
            le = lw.experts
            mask = torch.zeros(len(le.ids), dtype=torch.bool)
            for e in ids:
                slot = le.slot_of(int(e))
                if slot is None:
                    raise PoolError(f"layer {i}: expert {e} is not loaded (loaded: {len(le.ids)} experts)")
                mask[slot] = True
            masks.append(None if bool(mask.all()) else mask.to(self.device))
        return ResolvedPool(masks, pool)

    # -- forward ---------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache, logits_at: str | Tensor = "last",
                collect_router_probs: bool = False, collect_routes: bool = False) -> ForwardOutput:
        """Run the new tokens through the model, appending to the cache.

        logits_at: "last" (one row per sequence), "all" (one per token), or an
        index tensor of packed rows. `collect_routes` reports, per MoE layer,
        the experts this very pass chose for every packed token and their weights.
        """
        T = batch.tokens.numel()
        for slot, s, n in zip(batch.slots, batch.starts, batch.counts):
            if s + n > cache.max_len:
                raise ValueError(f"sequence in slot {slot} needs {s + n} positions; the cache holds {cache.max_len}")
        with self.kernels.small_step(T):
            x, cos, sin = self.embed(batch)
            routes: list[Route | None] = []
            collect = collect_router_probs or collect_routes
            for i in range(len(self.w.layers)):
                x = self.attention_block(i, x, cos, sin, batch, cache)
                x, r = self.mlp_block(i, x, self._allowed(i, batch, T), collect)
                routes.append(r)
        for slot, s, n in zip(batch.slots, batch.starts, batch.counts):
            cache.lengths[slot] = s + n
        if isinstance(logits_at, str):
            if logits_at == "last":
                rows = torch.tensor(batch.counts).cumsum(0) - 1
                x = x[rows.to(self.device)]
            elif logits_at != "all":
                raise ValueError(f"logits_at must be 'last', 'all' or an index tensor, not {logits_at!r}")
        else:
            x = x[logits_at.to(self.device)]
        return ForwardOutput(self.head(x),
                             [None if r is None else r.probs for r in routes] if collect_router_probs else None,
                             [self._chosen(i, r) for i, r in enumerate(routes)] if collect_routes else None)

    def _chosen(self, i: int, r: Route | None) -> ChosenExperts | None:
        if r is None:
            return None
        ids = torch.tensor(self.w.layers[i].experts.ids, dtype=torch.int64, device=r.indices.device)
        return ChosenExperts(ids[r.indices].masked_fill(~r.valid, -1), r.weights, r.probs)

    # -- the pieces of a forward pass, public so that a layer-at-a-time pass over
    #    a checkpoint larger than memory (the subset builder) runs the same code --
    def embed(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Token embeddings of the packed batch and the RoPE tables of its positions."""
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.starts, batch.counts)]).to(self.device)
        cos, sin = rope_tables(self.cfg.rope, self.cfg.head_dim, positions)
        return F.embedding(batch.tokens.to(self.device), self.w.embed), cos, sin

    def attention_block(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, batch: Batch, cache) -> Tensor:
        """x + attention(RMSNorm(x)) for layer i; writes the batch's keys and values to `cache`."""
        lw = self.w.layers[i]
        return x + self._attention(i, lw, self._norm(x, lw.attn_norm), cos, sin, batch, cache)

    def mlp_input(self, i: int, x: Tensor) -> Tensor:
        """RMSNorm(x) before layer i's MoE (or dense MLP): what its router sees."""
        return self._norm(x, self.w.layers[i].mlp_norm)

    def mlp_block(self, i: int, x: Tensor, allowed: Tensor | None = None, collect: bool = False,
                  h: Tensor | None = None) -> tuple[Tensor, Route | None]:
        """x + MoE(RMSNorm(x)) (or the dense MLP) for layer i, and the layer's
        `Route` when `collect`. `allowed` `[T, S]` restricts routing; `h` is
        `mlp_input(i, x)` when the caller already has it."""
        lw = self.w.layers[i]
        h = self.mlp_input(i, x) if h is None else h
        if lw.experts is None:
            return x + self._dense(lw, h), None
        y, r = self.moe(i, h, allowed, collect)
        return x + y, r

    def head(self, x: Tensor) -> Tensor:
        """float32 logits of the final hidden states."""
        return self._linear(self._norm(x, self.w.final_norm), self.w.lm_head).float()

    def _allowed(self, layer: int, batch: Batch, T: int) -> Tensor | None:
        masks = [p.masks[layer] if p is not None else None for p in batch.pools] if batch.pools else []
        if not any(m is not None for m in masks):
            return None
        S = len(self.w.layers[layer].experts.ids)
        full = torch.ones(S, dtype=torch.bool, device=self.device)
        per_seq = torch.stack([full if m is None else m for m in masks])
        return per_seq.repeat_interleave(torch.tensor(batch.counts, device=self.device), dim=0, output_size=T)

    def _attention(self, i: int, lw: LayerWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch,
                   cache: KVCache) -> Tensor:
        cfg = self.cfg
        T = h.shape[0]
        q, k, v = self._linear(h, lw.q, lw.q_bias), self._linear(h, lw.k, lw.k_bias), self._linear(h, lw.v, lw.v_bias)
        if cfg.qk_norm == "proj":  # OLMoE: RMSNorm over the whole projection, before the head split
            q = self._norm(q, lw.q_norm)
            k = self._norm(k, lw.k_norm)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, cfg.num_heads, cfg.head_dim)
        k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":  # Qwen3, GLM: RMSNorm over head_dim, after the head split
            q = self._norm(q, lw.q_norm)
            k = self._norm(k, lw.k_norm)
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [heads, T, D]
        v = v.view(T, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = torch.empty(cfg.num_heads, T, cfg.head_dim, dtype=q.dtype, device=q.device)
        window = cfg.sliding_windows[i]
        sinks = lw.sinks
        off = 0
        for slot, s, n in zip(batch.slots, batch.starts, batch.counts):
            keys, vals, first = cache.write(i, slot, s, k[:, off:off + n], v[:, off:off + n])
            qs = q[:, off:off + n]
            if n == 1:  # every key the cache returns is visible to a single query
                o = self.kernels.attend_decode(qs[:, 0], keys, vals, sinks, cfg.head_dim ** -0.5)
                out[:, off] = _decode_attention(qs[:, 0], keys, vals, sinks) if o is None else o
            else:
                out[:, off:off + n] = _prefill_attention(qs, keys, vals, s, first, window, sinks)
            off += n
        out = out.transpose(0, 1).reshape(T, cfg.num_heads * cfg.head_dim)
        return self._linear(out, lw.o, lw.o_bias)

    def expert(self, e: Expert, x: Tensor) -> Tensor:
        """One expert on `x` `[T, H]` (int8 when the model is quantized)."""
        if e.interleaved:
            ex = self.cfg.extra
            linear = F.linear if e.mx_gate_up is not None else self._linear
            return clamped_swiglu_expert(e, x, ex["swiglu_alpha"], ex["swiglu_limit"], linear, self.mxfp4_cache,
                                         fused_decode=self.compile_decode)
        return expert_forward(e, x, self._linear)

    def _dense(self, lw: LayerWeights, h: Tensor) -> Tensor:
        d = lw.dense
        gb, ub, db = lw.dense_bias or (None, None, None)
        lin = self._linear
        return lin(F.silu(lin(h, d.gate, gb)) * lin(h, d.up, ub), d.down, db)

    def route(self, i: int, h: Tensor, allowed: Tensor | None = None) -> Route:
        """Layer i's expert choice for normed hidden states `h` (router in the
        checkpoint's dtype or, where the family says so, float32; never
        quantized; scores in float32), by the family's routing rule."""
        rule, le = self.cfg.routing, self.w.layers[i].experts
        if rule.router_float32:
            logits = F.linear(h.float(), le.router.float(), None if le.logit_bias is None else le.logit_bias.float())
        else:  # the router's own dtype: the dense kernels (one small product, no OpenMP region to wake)
            logits = self.kernels.unquantized(h, le.router, le.logit_bias)
        return route(logits, rule, allowed=allowed, shared=le.shared_mask, always_active=le.always_mask,
                     bias=le.bias, groups=le.group_ids)

    def moe(self, i: int, h: Tensor, allowed: Tensor | None = None,
            collect: bool = False) -> tuple[Tensor, Route | None]:
        """Layer i's mixture of experts on normed hidden states `h` `[T, H]`
        (routed experts, plus the family's always-on shared MLP if it has one)."""
        lw = self.w.layers[i]
        le = lw.experts
        r = self.route(i, h, allowed)
        out = self._moe_fused(le, h, r)
        if out is None:  # the torch path: one call per expert matrix
            out = self._moe_one(le, h, r) if r.indices.shape[0] == 1 else self._moe_many(le, h, r)
        out = out.to(h.dtype)
        if lw.shared_mlp is not None:
            out = out + self.expert(lw.shared_mlp, h)
        return out, (r if collect else None)

    def _moe_fused(self, le, h: Tensor, r: Route) -> Tensor | None:
        """Every chosen expert of every token in one native call (None: the native path does not take
        these experts, or an MXFP4 dequantization cache was asked for)."""
        if self.mxfp4_cache is not None:
            return None
        ex = self.cfg.extra
        act = (ex["swiglu_alpha"], ex["swiglu_limit"]) if le.experts[0].interleaved else None  # gpt-oss
        return self.kernels.moe(le, h, r.indices, r.weights, r.valid, act)

    def _moe_one(self, le, h: Tensor, r: Route) -> Tensor:
        # Same arithmetic as _moe_many for one row: float32 sum over the chosen
        # experts in increasing slot order.
        pairs = sorted((e, w) for e, w, ok in zip(r.indices[0].tolist(), r.weights[0], r.valid[0].tolist()) if ok)
        out = torch.zeros(1, h.shape[1], dtype=torch.float32, device=h.device)
        for e, w in pairs:
            out += self.expert(le.experts[e], h).float() * w
        return out

    def _moe_many(self, le, h: Tensor, r: Route) -> Tensor:
        T, k = r.indices.shape
        flat_e = r.indices.flatten()
        keep = r.valid.flatten()
        tok = torch.arange(T, device=h.device).repeat_interleave(k)
        flat_w = r.weights.flatten()
        if not bool(keep.all()):
            flat_e, tok, flat_w = flat_e[keep], tok[keep], flat_w[keep]
        order = torch.argsort(flat_e, stable=True)
        flat_e, tok, flat_w = flat_e[order], tok[order], flat_w[order]
        ids, counts = torch.unique_consecutive(flat_e, return_counts=True)
        # Accumulate in float32: the sum over k experts is where bf16 would lose bits.
        out = torch.zeros(T, h.shape[1], dtype=torch.float32, device=h.device)
        off = 0
        for e, c in zip(ids.tolist(), counts.tolist()):
            idx = tok[off:off + c]
            xe = h[idx] if c != T else h
            y = self.expert(le.experts[e], xe)
            out.index_add_(0, idx, y.float() * flat_w[off:off + c, None])
            off += c
        return out




def _decode_attention(q: Tensor, keys: Tensor, vals: Tensor, sinks: Tensor | None = None) -> Tensor:
    """One query per head against a cache slot: q `[heads, D]`, keys/values
    `[kv_heads, L, D]` (strided views of the cache, read in place).

    Two small matmuls and a float32 softmax; for a single query this beats
    scaled_dot_product_attention on CPU, whose fallback copies the cached keys
    and values every step. Query heads are grouped over their kv head (GQA).
    `sinks` `[heads]` (gpt-oss): one more logit per head in the softmax, whose
    probability mass is dropped (it attends to nothing).
    """
    kvh, L, D = keys.shape
    qg = q.reshape(kvh, -1, D)  # [kv_heads, group, D]
    scores = torch.matmul(qg, keys.transpose(1, 2)).float() * (D ** -0.5)  # [kv_heads, group, L]
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = _softmax_with_sink(scores, sinks.float().view(kvh, -1, 1))
    return torch.matmul(probs.to(vals.dtype), vals).reshape(-1, D)


def _softmax_with_sink(scores: Tensor, sink: Tensor) -> Tensor:
    """softmax over [scores, sink] along the last dim, the sink's column dropped
    (as transformers' eager gpt-oss attention computes it)."""
    combined = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1)[..., :-1]


# Score elements per block of queries in the eager (sink) path: bounds its
# float32 [heads, rows, keys] scores at 64 MiB whatever the prompt length.
_EAGER_BLOCK = 1 << 24


def _prefill_attention(q: Tensor, keys: Tensor, vals: Tensor, start: int, first: int, window: int | None,
                       sinks: Tensor | None) -> Tensor:
    """Queries `[heads, n, D]` at positions start.. against keys `[kv_heads, L, D]`
    at positions first..: causal, and within `window` positions when the layer
    slides (a key at p is seen by queries at p .. p + window - 1, as transformers'
    sliding mask `kv > q - window`)."""
    h, n, D = q.shape
    kvh, L, _ = keys.shape
    qpos = torch.arange(start, start + n, device=q.device)[:, None]
    kpos = torch.arange(first, first + L, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    if sinks is None:
        causal = start == 0 and first == 0 and (window is None or n <= window)  # the mask is plain causal
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=None if causal else mask,
                                              is_causal=causal, enable_gqa=kvh != h)
    qg = q.reshape(kvh, h // kvh, n, D)
    sink = sinks.float().view(kvh, h // kvh, 1, 1)
    out = torch.empty_like(qg)
    rows = max(1, _EAGER_BLOCK // (h * L))
    for r in range(0, n, rows):
        scores = torch.matmul(qg[:, :, r:r + rows], keys[:, None].transpose(-1, -2)).float() * (D ** -0.5)
        scores = scores.masked_fill(~mask[r:r + rows], float("-inf"))
        probs = _softmax_with_sink(scores, sink)
        out[:, :, r:r + rows] = torch.matmul(probs.to(vals.dtype), vals[:, None])
    return out.reshape(h, n, D)


def expert_forward(e: Expert, x: Tensor, linear=F.linear) -> Tensor:
    """One SwiGLU expert on `x` `[T, H]`: down(silu(gate(x)) * up(x))."""
    if e.gate_up is not None:  # gate and up stored back to back: one matrix, one pass
        g, u = linear(x, e.gate_up).chunk(2, dim=-1)
    else:
        g, u = linear(x, e.gate), linear(x, e.up)
    return linear(F.silu(g) * u, e.down)


def clamped_swiglu_expert(e: Expert, x: Tensor, alpha: float, limit: float, linear=F.linear,
                          cache: DequantCache | None = None, fused_decode: bool = False) -> Tensor:
    """One gpt-oss expert on `x` `[T, H]`, as transformers' GptOssExperts: gate and
    up interleaved in one product (gate = columns 0::2), gate clamped above at
    `limit`, up to +-limit, out = down((up + 1) * gate * sigmoid(alpha * gate)) + bias.
    MXFP4 weights are dequantized here, for this expert only (or taken from `cache`);
    with `fused_decode` (`--compile`) and no cache, one row multiplies the 4-bit
    bytes directly (`mxfp4.gemv`), never expanding the expert."""
    if fused_decode and cache is None and e.mx_gate_up is not None and x.shape[0] == 1:
        gate_up = mxfp4_gemv(x, e.mx_gate_up, e.gate_up_bias)

        def down(h: Tensor) -> Tensor:
            return mxfp4_gemv(h, e.mx_down, e.down_bias)
    else:
        gu_w, dn_w = e.weights(x.dtype, cache)
        gate_up = linear(x, gu_w, e.gate_up_bias)

        def down(h: Tensor) -> Tensor:
            return linear(h, dn_w, e.down_bias)
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return down((up + 1) * (gate * torch.sigmoid(gate * alpha)))
