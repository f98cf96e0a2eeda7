"""A trainable re-implementation of a `modeling.Model` over a subset of its experts.

The model core (`modeling/`) is inference-only: its forward runs under
`torch.inference_mode` and will move to fused kernels. Repair (training/repair.py)
needs gradients, so `SubsetLM` runs the same forward pass with plain autograd ops
over the same weights, built from `modeling`'s own blocks (`rms_norm`,
`rope_tables`, `apply_rope`, `routing.route`):

- embeddings, norms, attention, dense and shared MLPs and the LM head are the
  model's tensors, frozen (float32);
- per MoE layer, the router rows and the SwiGLU weights of the chosen slots are
  parameters (float32 copies, stacked `[S, I, H]`), so the mapped checkpoint is
  never written to.

`check_against(model, ids, pool)` compares its logits with modeling's forward
(restricted to the same pool) before any training: what is trained is what the
server runs. Families whose attention or experts differ from this path (sliding
windows, attention sinks, gpt-oss's clamped experts, quantized weights) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling import Model
from modeling.layers import apply_rope, rms_norm, rope_tables
from modeling.quant import PackedLinear
from modeling.layers.routing import route


class RepairError(ValueError):
    """Input repair cannot work with (the message says what is wrong)."""


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def _lin(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ w.T (+ b) for a frozen matrix, in float32 out: a 16-bit matrix multiplies in its
    own dtype rather than being copied to float32 at every step (a large model's
    embeddings and head would be copied whole)."""
    if w.dtype == torch.float32:
        return F.linear(x, w, _f32(b))
    return F.linear(x.to(w.dtype), w.detach(), None if b is None else b.detach()).float()


def _expert_weights(e) -> tuple[Tensor, Tensor, Tensor]:
    if e.gate is not None:
        return e.gate, e.up, e.down
    inter = e.gate_up.shape[0] // 2  # gate and up stored back to back
    return e.gate_up[:inter], e.gate_up[inter:], e.down


def _check_supported(model: Model) -> None:
    cfg, w = model.config, model.weights
    why = None
    if any(win is not None for win in cfg.sliding_windows):
        why = "sliding-window attention"
    for lw in w.layers:
        if lw.sinks is not None:
            why = "attention sinks"
        mats = [lw.q, lw.k, lw.v, lw.o]
        if lw.experts is not None:
            for e in lw.experts.experts:
                if e.interleaved:
                    why = "interleaved (gpt-oss) experts"
                mats += e.matrices()
            if lw.experts.logit_bias is not None:
                why = "router logit biases"
        if any(isinstance(m, PackedLinear) for m in mats):
            why = "quantized weights"
    if why:
        raise RepairError(f"{model.path}: repair does not support {why} ({cfg.model_type}); "
                          "use a float checkpoint of EMO, OLMoE, Qwen3-MoE, Mixtral or GLM")


class SubsetLM(nn.Module):
    """`SubsetLM(model, slots)`: slots {layer: [slot indices of model.layer_experts(layer)]}
    (None: every loaded slot). Parameters: `router.{i}` [S, H], `gate.{i}`, `up.{i}`
    [S, I, H] and `down.{i}` [S, H, I] per MoE layer, in slot order.
    `trainable=False` (the full model as a teacher): no copies, every weight is
    read from the model's own tensors (converted to float32 per use), so a teacher
    costs no memory beyond the model's mapped files."""

    def __init__(self, model: Model, slots: dict[int, list[int]] | None = None, trainable: bool = True):
        super().__init__()
        _check_supported(model)
        self.cfg = cfg = model.config
        self.w = model.weights
        self.router, self.gate, self.up, self.down = (nn.ParameterDict() for _ in range(4))
        self.frozen: dict[int, dict[str, Tensor | None]] = {}
        self.ids: dict[int, list[int]] = {}  # original expert id per trained slot
        self.trainable = trainable
        self.views: dict[int, list] = {}  # trainable=False: the model's Expert objects per slot
        for i, lw in enumerate(self.w.layers):
            le = lw.experts
            if le is None:
                continue
            sl = list(range(len(le.ids))) if slots is None else list(slots[i])
            idx = torch.tensor(sl, dtype=torch.long)
            k = str(i)
            self.router[k] = nn.Parameter(le.router.detach().float()[idx].clone(), requires_grad=trainable)
            if trainable:
                g, u, d = zip(*(_expert_weights(le.experts[s]) for s in sl))
                self.gate[k] = nn.Parameter(torch.stack([t.float() for t in g]))
                self.up[k] = nn.Parameter(torch.stack([t.float() for t in u]))
                self.down[k] = nn.Parameter(torch.stack([t.float() for t in d]))
            else:
                self.views[i] = [le.experts[s] for s in sl]
            self.ids[i] = [le.ids[s] for s in sl]
            self.frozen[i] = {
                "shared": None if le.shared_mask is None else le.shared_mask[idx],
                "always": None if le.always_mask is None else le.always_mask[idx],
                "bias": None if le.bias is None else le.bias.float()[idx],
                "groups": None if le.group_ids is None else le.group_ids[idx],
            }

    # -- which weights train -----------------------------------------------------
    def train_only(self, *groups: str) -> list[nn.Parameter]:
        """Make only the named parameter groups ("router", "experts") trainable; returns them."""
        out = []
        for name, pd in (("router", self.router), ("experts", self.gate), ("experts", self.up),
                         ("experts", self.down)):
            for p in pd.values():
                p.requires_grad_(name in groups)
                if name in groups:
                    out.append(p)
        return out

    # -- forward ------------------------------------------------------------------
    def _attention(self, lw, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cfg = self.cfg
        B, L, _ = x.shape

        lin = _lin
        q, k, v = lin(x, lw.q, lw.q_bias), lin(x, lw.k, lw.k_bias), lin(x, lw.v, lw.v_bias)
        if cfg.qk_norm == "proj":
            q, k = rms_norm(q, _f32(lw.q_norm), cfg.rms_norm_eps), rms_norm(k, _f32(lw.k_norm), cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(B, L, cfg.num_heads, cfg.head_dim)
        k = k.view(B, L, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = rms_norm(q, _f32(lw.q_norm), cfg.rms_norm_eps), rms_norm(k, _f32(lw.k_norm), cfg.rms_norm_eps)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, L, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        return lin(o.transpose(1, 2).reshape(B, L, -1), lw.o, lw.o_bias)

    @staticmethod
    def _mlp(e, h: Tensor) -> Tensor:
        g, u, d = _expert_weights(e)
        return _lin(F.silu(_lin(h, g)) * _lin(h, u), d)

    def route(self, i: int, h: Tensor):
        fz = self.frozen[i]
        return route(h @ self.router[str(i)].t(), self.cfg.routing, shared=fz["shared"], always_active=fz["always"],
                     bias=fz["bias"], groups=fz["groups"])

    def expert_weights(self, i: int, s: int) -> tuple[Tensor, Tensor, Tensor]:
        """float32 (gate [I, H], up [I, H], down [H, I]) of slot s of layer i."""
        if self.trainable:
            k = str(i)
            return self.gate[k][s], self.up[k][s], self.down[k][s]
        return tuple(t.float() for t in _expert_weights(self.views[i][s]))

    def _expert(self, i: int, s: int, x: Tensor) -> Tensor:
        g, u, d = self.expert_weights(i, s)
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

    def experts_out(self, i: int, h: Tensor) -> Tensor:
        """[S, T, H]: every expert of layer i on every row of h (merge's measure)."""
        return torch.stack([self._expert(i, s, h) for s in range(len(self.ids[i]))])

    def moe(self, i: int, h: Tensor) -> Tensor:
        """h [T, H] -> routed mixture over the trained slots (+ the shared MLP)."""
        k = str(i)
        r = self.route(i, h)
        T, topk = r.indices.shape
        flat_e, flat_w = r.indices.reshape(-1), r.weights.reshape(-1)
        tok = torch.arange(T).repeat_interleave(topk)
        keep = r.valid.reshape(-1)
        flat_e, flat_w, tok = flat_e[keep], flat_w[keep], tok[keep]
        out = torch.zeros_like(h)
        for s in flat_e.unique().tolist():
            sel = flat_e == s
            rows = tok[sel]
            y = self._expert(i, s, h[rows])
            out = out.index_add(0, rows, y * flat_w[sel, None])
        lw = self.w.layers[i]
        if lw.shared_mlp is not None:
            out = out + self._mlp(lw.shared_mlp, h)
        return out

    def forward(self, tokens: Tensor, capture: list | None = None) -> Tensor:
        """tokens [B, L] (sequences padded at the end) -> float32 logits [B, L, V].
        `capture`, when a list, receives per MoE layer (index, normed MoE input [B*L, H])."""
        cfg = self.cfg
        B, L = tokens.shape
        x = F.embedding(tokens, self.w.embed.detach()).float()
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, torch.arange(L))
        for i, lw in enumerate(self.w.layers):
            x = x + self._attention(lw, rms_norm(x, _f32(lw.attn_norm), cfg.rms_norm_eps), cos, sin)
            h = rms_norm(x, _f32(lw.mlp_norm), cfg.rms_norm_eps).reshape(B * L, -1)
            if lw.experts is None:
                y = self._mlp(lw.dense, h)
            else:
                if capture is not None:
                    capture.append((i, h.detach()))
                y = self.moe(i, h)
            x = x + y.view(B, L, -1)
        return _lin(rms_norm(x, _f32(self.w.final_norm), cfg.rms_norm_eps), self.w.lm_head)

    # -- checks and export ------------------------------------------------------------
    @torch.no_grad()
    def check_against(self, model: Model, ids: list[int], pool: dict[int, list[int]] | None) -> float:
        """Max |logit difference| against modeling's forward on `ids` (restricted to `pool`);
        raises RepairError when it is beyond float tolerance."""
        ref = model.logits(ids, pool=pool)
        mine = self(torch.tensor([ids]))[0]
        diff = float((ref - mine).abs().max())
        if model.dtype == torch.float32:  # float32 against float32 agrees to rounding
            ok = diff <= 1e-3 * max(1.0, float(ref.abs().max()))
        else:  # a 16-bit model's own forward rounds its activations: compare on average (a wrong
            # layout is off by the logits' own size, rounding by a few per cent of it)
            ok = float((ref - mine).abs().mean()) <= 0.03 * float(ref.abs().mean())
        if not ok:
            raise RepairError(f"{model.path}: the trainable forward differs from the model's by {diff:.3g} "
                              "(this family's layout is not supported by repair)")
        return diff

    def expert_tensors(self, names) -> dict[str, Tensor]:
        """{tensor name: float32 tensor} of every trained router and expert, in the family's
        per-expert naming (`names`: modeling.names of the config), slots renumbered 0..S-1."""
        out: dict[str, Tensor] = {}
        for i in self.ids:
            out[names.router(i)] = self.router[str(i)].detach().clone()
            for s in range(len(self.ids[i])):
                for name, t in zip(names.expert_tensor_names(i, s), self.expert_weights(i, s)):
                    out[name] = t.detach().clone()
        return out
