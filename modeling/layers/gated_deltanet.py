"""Gated DeltaNet: the linear-attention layer of Qwen3-Next and Qwen3.5-MoE (arXiv 2412.06464).

Per token t and value head h the layer keeps a matrix state S `[dk, dv]` instead of
keys and values:

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T      (the gated delta rule)
    o_t = S_t^T q_t

with q, k L2-normalised (q also scaled by dk^-0.5), beta_t = sigmoid(b_t) and
g_t = -exp(A_log) softplus(a_t + dt_bias) <= 0. Before the rule, q|k|v pass a short
causal depthwise convolution (kernel 4) and SiLU; after it, a gated RMSNorm
(RMSNorm(o) * w * silu(z)) and the output projection.

A sequence's whole past is therefore two fixed-size tensors per layer, held per
cache slot (`DeltaNetState`): the last K-1 convolution inputs, and S in float32.
Prefill runs the rule in chunks of 64 tokens (the WY form: one triangular solve
per chunk, `chunk_delta_rule`); decode runs one step per decoding sequence,
in place on its state row (`step_delta_rule`). Both start from the slot's
state, so a prompt fed in any split, or beside other sequences, gives the same
result. The arithmetic follows transformers' torch path (float32 rule, conv and
norm as it casts them), which the tests compare against.

Dense products go through the `linear` the caller passes (the model's kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Attention, AttentionWeights, GroupedQueryAttention, LayerOps, TensorSpec, attend
from .cache import LayerState

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import Batch
    from ..names import TensorNames

Linear = Callable[..., Tensor]  # linear(x, w, bias=None), as Transformer.kernels.linear

CHUNK = 64  # prefill chunk of the delta rule (transformers' and FLA's default)


@dataclass(frozen=True)
class DeltaNetShape:
    """Sizes of one Gated DeltaNet layer, from config.json's `linear_*` keys."""

    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float  # of the gated RMSNorm (rms_norm_eps)

    def __post_init__(self):
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads {self.num_v_heads} is not a multiple of "
                             f"linear_num_key_heads {self.num_k_heads}")
        if self.conv_kernel < 1:
            raise ValueError(f"linear_conv_kernel_dim must be >= 1, not {self.conv_kernel}")

    @classmethod
    def from_config(cls, d: dict) -> "DeltaNetShape":
        return cls(int(d["linear_num_key_heads"]), int(d["linear_num_value_heads"]), int(d["linear_key_head_dim"]),
                   int(d["linear_value_head_dim"]), int(d["linear_conv_kernel_dim"]), float(d["rms_norm_eps"]))

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:  # channels of the convolution: q | k | v
        return 2 * self.key_dim + self.value_dim

    def state_bytes(self, itemsize: int) -> int:
        """Bytes one sequence holds in one layer: conv inputs (model dtype) and S (float32)."""
        return self.conv_dim * (self.conv_kernel - 1) * itemsize + self.num_v_heads * self.head_k_dim * self.head_v_dim * 4


@dataclass
class DeltaNetWeights:
    """One layer's tensors in nn.Linear layout. Qwen3.5 stores q|k|v, z, b and a as
    four projections (`qkv`, `z`, `b`, `a`); Qwen3-Next stores two fused ones whose rows
    are grouped per key head (`qkvz`: per key head q, k, then its value heads' v and z;
    `ba`: per key head its b, then its a), split after the product (`project`)."""

    conv: Tensor  # [conv_dim, 1, K] depthwise kernel (conv1d.weight as stored)
    dt_bias: Tensor  # [Hv]
    A_log: Tensor  # [Hv]
    norm: Tensor  # [head_v_dim] gated RMSNorm weight
    out: Tensor  # [H, value_dim]
    qkv: Tensor | None = None
    z: Tensor | None = None
    b: Tensor | None = None
    a: Tensor | None = None
    qkvz: Tensor | None = None
    ba: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.qkv, self.z, self.b, self.a, self.qkvz, self.ba, self.conv, self.dt_bias,
                            self.A_log, self.norm, self.out) if t is not None]


class DeltaNetState(LayerState):
    """The per-sequence state of one Gated DeltaNet layer, one row per cache slot:
    `conv` `[slots, conv_dim, K-1]` (the last K-1 inputs of the convolution, model
    dtype) and `recurrent` `[slots, Hv, dk, dv]` (S, float32). Its size does not grow
    with the sequence. A sequence starting at position 0 starts from zeros, whatever
    an earlier owner of the slot left (`torch.empty`: untouched slots cost no pages)."""

    def __init__(self, shape: DeltaNetShape, num_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.shape = shape
        self.conv = torch.empty(num_slots, shape.conv_dim, shape.conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.empty(num_slots, shape.num_v_heads, shape.head_k_dim, shape.head_v_dim,
                                     dtype=torch.float32, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.conv, self.recurrent]

    def read(self, slot: int, start: int) -> tuple[Tensor, Tensor]:
        """(conv inputs `[conv_dim, K-1]`, S `[Hv, dk, dv]`) before position `start` (copies)."""
        if start == 0:
            return torch.zeros_like(self.conv[slot]), torch.zeros_like(self.recurrent[slot])
        return self.conv[slot].clone(), self.recurrent[slot].clone()


def project(w: DeltaNetWeights, shape: DeltaNetShape, h: Tensor, linear: Linear
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h `[T, H]` -> (q|k|v `[T, conv_dim]`, z `[T, value_dim]`, b `[T, Hv]`, a `[T, Hv]`)."""
    if w.qkvz is None:
        return linear(h, w.qkv), linear(h, w.z), linear(h, w.b), linear(h, w.a)
    T, nk, dk, dv = h.shape[0], shape.num_k_heads, shape.head_k_dim, shape.head_v_dim
    r = shape.num_v_heads // nk
    q, k, v, z = linear(h, w.qkvz).view(T, nk, -1).split([dk, dk, r * dv, r * dv], dim=-1)
    b, a = linear(h, w.ba).view(T, nk, 2 * r).split([r, r], dim=-1)
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
    return qkv, z.reshape(T, -1), b.reshape(T, -1), a.reshape(T, -1)


def causal_conv(x: Tensor, past: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """SiLU(depthwise causal conv) of x `[n, C]` after the inputs `past` `[C, K-1]`;
    returns the output `[n, C]` and the new last K-1 inputs."""
    n = x.shape[0]
    full = torch.cat([past, x.t().to(past.dtype)], dim=-1)  # [C, K-1+n]
    y = F.silu(F.conv1d(full[None].to(weight.dtype), weight, groups=weight.shape[0])[0])  # [C, n]
    keep = past.shape[-1]
    return y.t().to(x.dtype), full[:, full.shape[-1] - keep:] if keep else past


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def rule_inputs(qkv: Tensor, b: Tensor, a: Tensor, w: DeltaNetWeights, shape: DeltaNetShape
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Convolved q|k|v `[n, conv_dim]`, b, a `[n, Hv]` -> float32 q, k `[Hv, n, dk]` (L2-normed,
    q scaled, each key head repeated over its value heads), v `[Hv, n, dv]`, g, beta `[Hv, n]`.
    The n rows are a sequence's tokens (prefill) or one token of n sequences (decode)."""
    n, s = qkv.shape[0], shape
    q, k, v = qkv.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
    r = s.num_v_heads // s.num_k_heads
    q, k = (t.reshape(n, s.num_k_heads, s.head_k_dim).repeat_interleave(r, dim=1) for t in (q, k))
    v = v.reshape(n, s.num_v_heads, s.head_v_dim)
    beta = b.sigmoid()
    g = -w.A_log.float().exp() * F.softplus(a.float() + w.dt_bias)
    q, k, v, beta, g = (t.transpose(0, 1).float().contiguous() for t in (q, k, v, beta, g))
    return _l2norm(q) * s.head_k_dim ** -0.5, _l2norm(k), v, g, beta


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                     chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    """The gated delta rule over n tokens of one sequence, in chunks (float32).

    q, k `[H, n, dk]`, v `[H, n, dv]`, g, beta `[H, n]`, state S `[H, dk, dv]`;
    returns o `[H, n, dv]` and the state after the last token. Inside a chunk, with
    G the cumulative log decay and D[t, j] = exp(G_t - G_j) (j <= t), the corrections
    u_t = beta_t (v_t - exp(G_t) S^T k_t - sum_{j<t} D[t, j] (k_t . k_j) u_j) are one
    unit-lower-triangular solve; then o_t = exp(G_t) S^T q_t + sum_{j<=t} D[t, j] (q_t . k_j) u_j
    and S' = exp(G_C) S + sum_j D[C, j] k_j u_j^T.
    """
    H, n, dk = k.shape
    out = v.new_empty(H, n, v.shape[-1])
    for c0 in range(0, n, chunk):
        sl = slice(c0, min(c0 + chunk, n))
        qc, kc, vc, gc, bc = q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl]
        C = kc.shape[1]
        G = gc.cumsum(-1)  # [H, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay = (G[:, :, None] - G[:, None, :]).masked_fill(~causal, float("-inf")).exp()  # D, 0 above the diagonal
        lower = (bc[:, :, None] * (kc @ kc.transpose(-1, -2)) * decay).tril(-1)
        eye = torch.eye(C, dtype=lower.dtype, device=q.device)
        # (I + L)^-1 solved on the identity (C columns, not dv + dk: several times faster), then two products
        inv = torch.linalg.solve_triangular(lower + eye, eye.expand_as(lower), upper=False, unitriangular=True)
        u = inv @ (bc[..., None] * vc) - (inv @ ((bc * G.exp())[..., None] * kc)) @ state  # [H, C, dv]
        out[:, sl] = (qc * G.exp()[..., None]) @ state + ((qc @ kc.transpose(-1, -2)) * decay) @ u
        last = G[:, -1:]  # [H, 1]
        state = state * last.exp()[..., None] + (kc * (last - G).exp()[..., None]).transpose(-1, -2) @ u
    return out, state


def step_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """One token of one sequence (float32): q, k `[H, dk]`, v `[H, dv]`, g, beta `[H]`; the
    state S `[H, dk, dv]` (the slot's own row) is updated in place; returns o `[H, dv]`.

    With a = exp(g): S' = a S + k delta^T, delta = beta (v - a S^T k), and
    o = S'^T q = a S^T q + (k . q) delta, so S is read once (S^T k and S^T q in one
    product) and written once (scaled, plus the outer product), never copied."""
    a = g.exp()[:, None]  # [H, 1]
    read = state.transpose(-1, -2) @ torch.stack([k, q], dim=-1)  # [H, dv, 2]: S^T k, S^T q
    delta = beta[:, None] * (v - a * read[..., 0])
    out = a * read[..., 1] + (k * q).sum(-1, keepdim=True) * delta
    state.mul_(a[..., None]).baddbmm_(k[:, :, None], delta[:, None, :])
    return out


def gated_norm(o: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm(o) * weight * silu(z) per value head (o, z `[..., dv]`), as transformers
    casts it: norm in float32, back to o's dtype, weight, then the float32 gate."""
    dtype = o.dtype
    h = o.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(z.float())).to(dtype)


def gated_deltanet(w: DeltaNetWeights, shape: DeltaNetShape, h: Tensor, state: DeltaNetState,
                   slots: list[int], starts: list[int], counts: list[int], linear: Linear = F.linear) -> Tensor:
    """The layer on a packed batch: h `[T, H]` holds `counts[i]` new tokens of sequence i,
    at positions `starts[i]`.., whose past lives in `state` row `slots[i]` (updated).
    Sequences with one new token and a past decode together (one batched conv, then each
    one's rule step in place on its state row); the others (prompts, prompt pieces) run
    the chunked rule one by one."""
    T = h.shape[0]
    qkv, z, b, a = project(w, shape, h, linear)
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    core = torch.empty(T, shape.num_v_heads, shape.head_v_dim, dtype=h.dtype, device=h.device)
    steps = [i for i, (s, n) in enumerate(zip(starts, counts)) if n == 1 and s > 0]
    decoding = set(steps)
    for i, (slot, s, n) in enumerate(zip(slots, starts, counts)):
        if i in decoding or n == 0:
            continue
        o0 = offsets[i]
        past_conv, past_s = state.read(slot, s)
        x, state.conv[slot] = causal_conv(qkv[o0:o0 + n], past_conv, w.conv)
        q, k, v, g, beta = rule_inputs(x, b[o0:o0 + n], a[o0:o0 + n], w, shape)
        o, state.recurrent[slot] = chunk_delta_rule(q, k, v, g, beta, past_s)
        core[o0:o0 + n] = o.transpose(0, 1).to(h.dtype)
    if steps:
        _decode(w, shape, qkv, b, a, state, [slots[i] for i in steps], [offsets[i] for i in steps], core)
    out = gated_norm(core, z.view(T, shape.num_v_heads, shape.head_v_dim), w.norm, shape.eps)
    return linear(out.reshape(T, shape.value_dim), w.out)


def _decode(w: DeltaNetWeights, shape: DeltaNetShape, qkv: Tensor, b: Tensor, a: Tensor, state: DeltaNetState,
            slots: list[int], rows: list[int], core: Tensor) -> None:
    """One new token for each of B sequences (packed rows `rows`), their states in `slots`:
    the convolution of all B at once, then each sequence's rule on its own state row in place."""
    idx = torch.tensor(slots, device=qkv.device)
    r = torch.tensor(rows, device=qkv.device)
    x = qkv[r]  # [B, C]
    window = torch.cat([state.conv[idx], x[:, :, None].to(state.conv.dtype)], dim=-1)  # [B, C, K]
    # the conv's last output, accumulated in float32 and rounded to the weight's dtype as a conv1d would
    y = F.silu((window.float() * w.conv[:, 0].float()).sum(-1).to(w.conv.dtype)).to(qkv.dtype)
    state.conv[idx] = window[:, :, 1:]
    q, k, v, g, beta = rule_inputs(y, b[r], a[r], w, shape)  # [Hv, B, ...]
    for j, (slot, row) in enumerate(zip(slots, rows)):
        o = step_delta_rule(q[:, j], k[:, j], v[:, j], g[:, j], beta[:, j], state.recurrent[slot])
        core[row] = o.to(core.dtype)


# -- the two attention kinds of Qwen3-Next / Qwen3.5 (modeling.layers.attention.ATTENTION_KINDS) ----------------


class GatedDeltaNetAttention(Attention):
    """"linear_attention" layers: the Gated DeltaNet above, its state a `DeltaNetState`
    (fixed size per slot, whatever `max_len`). Tensors under `linear_attn.`: four
    projections (Qwen3.5) or two fused ones (Qwen3-Next, `cfg.extra["deltanet_fused"]`)."""

    roles = ("qkv", "z", "b", "a", "qkvz", "ba", "conv", "dt_bias", "A_log", "norm", "out")

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.shape: DeltaNetShape = cfg.extra["deltanet"]
        self.fused = bool(cfg.extra.get("deltanet_fused"))

    def specs(self, names: TensorNames) -> list[TensorSpec]:
        s, H, i = self.shape, self.cfg.hidden_size, self.layer
        proj = ([("qkvz", "in_proj_qkvz.weight", (s.conv_dim + s.value_dim, H)),
                 ("ba", "in_proj_ba.weight", (2 * s.num_v_heads, H))] if self.fused else
                [("qkv", "in_proj_qkv.weight", (s.conv_dim, H)), ("z", "in_proj_z.weight", (s.value_dim, H)),
                 ("b", "in_proj_b.weight", (s.num_v_heads, H)), ("a", "in_proj_a.weight", (s.num_v_heads, H))])
        rest = [("conv", "conv1d.weight", (s.conv_dim, 1, s.conv_kernel)), ("dt_bias", "dt_bias", (s.num_v_heads,)),
                ("A_log", "A_log", (s.num_v_heads,)), ("norm", "norm.weight", (s.head_v_dim,)),
                ("out", "out_proj.weight", (H, s.value_dim))]
        return [TensorSpec(role, names.linear_attn(i, part), shape) for role, part, shape in proj + rest]

    def new_state(self, num_slots: int, max_len: int, dtype: torch.dtype, device) -> DeltaNetState:
        return DeltaNetState(self.shape, num_slots, dtype, device)

    def state_bytes(self, num_slots: int, max_len: int, itemsize: int) -> int:
        return num_slots * self.shape.state_bytes(itemsize)

    def forward(self, w: AttentionWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch, state: DeltaNetState,
                ops: LayerOps) -> Tensor:
        weights = DeltaNetWeights(conv=w.conv, dt_bias=w.dt_bias, A_log=w.A_log, norm=w.norm, out=w.out, qkv=w.qkv,
                                  z=w.z, b=w.b, a=w.a, qkvz=w.qkvz, ba=w.ba)
        return gated_deltanet(weights, self.shape, h, state, batch.slots, batch.starts, batch.counts, ops.linear)


class GatedAttention(GroupedQueryAttention):
    """"full_attention" layers of Qwen3-Next / Qwen3.5: grouped-query attention whose
    `q_proj` also yields a per-head output gate (rows per head: head_dim query, then
    head_dim gate), output = o_proj(attention * sigmoid(gate)); per-head q/k RMSNorm with
    zero-centred weights (1 + w); partial RoPE (the first head_dim * 0.25 dims rotate)."""

    def specs(self, names: TensorNames) -> list[TensorSpec]:
        out = []
        for s in super().specs(names):
            if s.role in ("q", "q_bias"):  # twice the rows: query and gate
                s = TensorSpec(s.role, s.name, (2 * s.shape[0], *s.shape[1:]))
            out.append(s)
        return out

    def forward(self, w: AttentionWeights, h: Tensor, cos: Tensor, sin: Tensor, batch: Batch, state,
                ops: LayerOps) -> Tensor:
        linear, norm, T, D = ops.linear, ops.norm, h.shape[0], self.head_dim  # norm: the family's (1 + w)
        q, gate = linear(h, w.q, w.q_bias).view(T, self.heads, 2 * D).chunk(2, dim=-1)
        k, v = linear(h, w.k, w.k_bias), linear(h, w.v, w.v_bias)
        q = norm(q, w.q_norm).transpose(0, 1)  # [heads, T, D]
        k = norm(k.view(T, self.kv_heads, D), w.k_norm).transpose(0, 1)
        v = v.view(T, self.kv_heads, D).transpose(0, 1)
        q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
        out = attend(q, k, v, batch, state, self.window, None, None, ops).transpose(0, 1).reshape(T, self.heads * D)
        return linear(out * torch.sigmoid(gate.reshape(T, self.heads * D)), w.o, w.o_bias)
