"""The forward pass of every family (modeling.families), in the spirit of gpt-fast: one readable file,
an explicit KV cache, no framework magic.

A batch is *packed*: the new tokens of every sequence are concatenated into
one `[T]` vector (as vLLM does), so prefill, decode and a mix of both run in the
same call and dense layers never compute on padding. Attention is the only
step that looks at sequences one at a time, each against its own cache slot.

Routing runs over the experts a layer has loaded (its *slots*); each sequence
brings a pool, resolved to a boolean mask over slots per layer, and the router
logits outside it are dropped before the softmax (`modeling.layers.routing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers.attention import Attention, LayerOps, attention_modules
from .layers.cache import KVCache
from .config import ModelConfig
from .layers.expert_kinds import EXPERT_KINDS, SWIGLU, ExpertKind
from .layers.blocks import ROPE_TYPES, rms_norm_offset, rope_tables
from .kernels import Kernels
from .quant.fp8 import Fp8Matrix
from .quant.mxfp4 import DequantCache
from .quant import Int8Cache, PackedLinear
from .layers.routing import Route, route
from .io.weights import Expert, LayerWeights, ModelWeights

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
        # the layer, final (and per-head q/k) RMSNorm: zero-centred weights scale by 1 + w (Qwen3-Next, Qwen3.5)
        # each layer's attention module, as the family declares it (cfg.layer_types)
        self.attention: list[Attention] = attention_modules(cfg)
        self.ops = LayerOps(self._linear, self._norm, self.kernels.attend_decode, self.kernels.rope,
                            self._linear_many)  # what the modules compute with
        self.expert_kind: ExpertKind = EXPERT_KINDS[cfg.expert_mlp]  # what one routed expert computes
        # the RoPE tables embed() computes: one width for the modules that rotate (None: none does)
        dims = {a.rope_dim for a in self.attention if a.rope_dim is not None}
        assert len(dims) <= 1, f"attention modules disagree on the RoPE width: {dims}"
        self.rope_dim = dims.pop() if dims else None
        self._rope_freqs = None if self.rope_dim is None else \
            ROPE_TYPES[cfg.rope.type](cfg.rope, cfg.rope.rotary_dim(self.rope_dim))  # per config, not per step

    def _linear(self, x: Tensor, w: Tensor | PackedLinear | Fp8Matrix, bias: Tensor | None = None,
                float_out: bool = False) -> Tensor:
        if isinstance(w, Fp8Matrix):  # block-scaled FP8: this matrix dequantized for this product only
            y = F.linear(x, w.dequantize(x.dtype), bias)
            return y.float() if float_out else y
        return self.kernels.linear(x, w, bias, float_out)

    def _linear_many(self, x: Tensor, ws, biases) -> list[Tensor]:
        if any(isinstance(w, Fp8Matrix) for w in ws):
            return [self._linear(x, w, b) for w, b in zip(ws, biases)]
        return self.kernels.linear_many(x, ws, biases)

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.cfg.norm_offset:  # zero-centred weights scale by 1 + w (Qwen3-Next, Qwen3.5): the torch path
            return rms_norm_offset(x, weight, self.cfg.rms_norm_eps)
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
        if len(batch.starts) == 1:
            positions = torch.arange(batch.starts[0], batch.starts[0] + batch.counts[0], device=self.device)
        else:
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(batch.starts, batch.counts)]).to(self.device)
        if self.rope_dim is None:
            cos = sin = positions.new_empty(0)
        else:
            cos, sin = rope_tables(self.cfg.rope, self.rope_dim, positions, self._rope_freqs)
        return F.embedding(batch.tokens.to(self.device), self.w.embed), cos, sin

    def attention_block(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, batch: Batch, cache) -> Tensor:
        """x + attention(RMSNorm(x)) for layer i (post-norm families: x + RMSNorm(attention(x))),
        by the layer's attention module, which writes the batch's state (keys and values, ...) to `cache`."""
        lw, attn = self.w.layers[i], self.attention[i]
        if self.cfg.norm_placement == "post":  # OLMo2 / FlexOlmo: the norm on the sublayer's output
            return x + self._norm(attn.forward(lw.attn, x, cos, sin, batch, cache[i], self.ops), lw.attn_norm)
        return x + attn.forward(lw.attn, self._norm(x, lw.attn_norm), cos, sin, batch, cache[i], self.ops)

    def mlp_input(self, i: int, x: Tensor) -> Tensor:
        """What layer i's MoE (or dense MLP) and its router see: RMSNorm(x), or x itself when the
        family norms the MLP's output instead (norm_placement "post")."""
        if self.cfg.norm_placement == "post":
            return x
        return self._norm(x, self.w.layers[i].mlp_norm)

    def _mlp_output(self, i: int, y: Tensor) -> Tensor:
        if self.cfg.norm_placement == "post":
            return self._norm(y, self.w.layers[i].mlp_norm)
        return y

    def mlp_block(self, i: int, x: Tensor, allowed: Tensor | None = None, collect: bool = False,
                  h: Tensor | None = None) -> tuple[Tensor, Route | None]:
        """x + MoE(RMSNorm(x)) (or the dense MLP) for layer i, and the layer's
        `Route` when `collect`. `allowed` `[T, S]` restricts routing; `h` is
        `mlp_input(i, x)` when the caller already has it."""
        lw = self.w.layers[i]
        h = self.mlp_input(i, x) if h is None else h
        if lw.experts is None:
            return x + self._mlp_output(i, self._dense(lw, h)), None
        y, r = self.moe(i, h, allowed, collect)
        return x + self._mlp_output(i, y), r

    def head(self, x: Tensor) -> Tensor:
        """float32 logits of the final hidden states."""
        return self._linear(self._norm(x, self.w.final_norm), self.w.lm_head, float_out=True)

    def _allowed(self, layer: int, batch: Batch, T: int) -> Tensor | None:
        masks = [p.masks[layer] if p is not None else None for p in batch.pools] if batch.pools else []
        if not any(m is not None for m in masks):
            return None
        S = len(self.w.layers[layer].experts.ids)
        full = torch.ones(S, dtype=torch.bool, device=self.device)
        per_seq = torch.stack([full if m is None else m for m in masks])
        return per_seq.repeat_interleave(torch.tensor(batch.counts, device=self.device), dim=0, output_size=T)

    def expert(self, e: Expert, x: Tensor) -> Tensor:
        """One routed expert on `x` `[T, H]`, by the family's expert kind (int8 when the model is quantized)."""
        return self.expert_kind.forward(self, e, x)

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
            logits = self.kernels.unquantized(h, le.router, le.logit_bias, float_out=True)
        return route(logits, rule, allowed=allowed, shared=le.shared_mask if le.any_shared else None,
                     always_active=le.always_mask if le.any_always else None, bias=le.bias, groups=le.group_ids)

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
            shared = SWIGLU.forward(self, lw.shared_mlp, h)
            if lw.shared_gate is not None:  # Qwen: the shared expert weighed by sigmoid(h . w) per token
                shared = torch.sigmoid(self._linear(h, lw.shared_gate)) * shared
            out = out + shared
        return out, (r if collect else None)

    def _moe_fused(self, le, h: Tensor, r: Route) -> Tensor | None:
        """Every chosen expert of every token in one native call (None: the native path does not take
        these experts, or an MXFP4 dequantization cache was asked for)."""
        if self.mxfp4_cache is not None:
            return None
        return self.kernels.moe(le, h, r.indices, r.weights, None if r.all_valid else r.valid,
                                self.expert_kind.native_act(self.cfg))

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
