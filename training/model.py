"""The trainable twin of `modeling`'s EMO model (same semantics, with gradients).

Building blocks come from `modeling.layers` (RMSNorm, RoPE, SwiGLU) and
routing from `modeling.layers.routing.route`, so training and inference route the
same way. What is training-only lives here:

- experts stored stacked (`[E, I, H]`) for speed, exported one tensor per
  expert in the EMO naming of docs/formats.md;
- the EMO document pool: the router softmax over the non-shared experts is
  averaged over each document's tokens, the top-N experts of that average form
  the document's pool (N drawn per document), everything else gets -inf for
  all its tokens (`allowed` mask of `route`);
- the load-balancing loss, computed over all tokens of the batch (all
  documents together, never per document), and a small router z-loss.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.layers import RMSNorm, apply_rope, rope_cos_sin, swiglu
from modeling.layers.routing import route


@dataclass
class TrainConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 128
    num_experts: int = 32
    num_experts_per_tok: int = 4
    num_shared_experts: int = 1  # 0 for the standard twin
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 256
    eos_token_id: int = 0
    pad_token_id: int = 1

    def hf_config(self) -> dict:
        d = asdict(self)
        d.update(
            model_type="emo",
            architectures=["EmoForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            norm_topk_prob=False,
            tie_word_embeddings=False,
            bos_token_id=self.eos_token_id,
            torch_dtype="bfloat16",
            hidden_act="silu",
        )
        return d


class Attention(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.nh, self.hd = c.num_attention_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.nh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.nh, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.nh * self.hd))


class MoE(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        E, I, H = c.num_experts, c.intermediate_size, c.hidden_size
        self.E, self.k, self.s = E, c.num_experts_per_tok, c.num_shared_experts
        self.gate = nn.Linear(H, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, I, H))
        self.w_up = nn.Parameter(torch.empty(E, I, H))
        self.w_down = nn.Parameter(torch.empty(E, H, I))
        shared = torch.zeros(E, dtype=torch.bool)
        if self.s:
            shared[E - self.s:] = True
        self.register_buffer("shared", shared, persistent=False)

    def pool_mask(self, logits: Tensor, group: Tensor, n_groups: int, pool_n: Tensor) -> Tensor:
        """EMO: `allowed` [T, E]; each group's pool = top-`pool_n[g]` of its mean routed softmax."""
        R = self.E - self.s
        with torch.no_grad():
            p = torch.softmax(logits[:, :R].float(), dim=-1)
            mean = torch.zeros(n_groups, R, dtype=p.dtype).index_add_(0, group, p)
            rank = mean.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = most used
            allowed_g = rank < pool_n[:, None]
            allowed_g = torch.cat([allowed_g, torch.ones(n_groups, self.s, dtype=torch.bool)], dim=1)
            return allowed_g[group]

    def forward(self, x: Tensor, group: Tensor | None, n_groups: int, pool_n: Tensor | None):
        """x [T, H] (real tokens only). Returns (out [T, H], aux dict)."""
        T, H = x.shape
        logits = self.gate(x).float()
        allowed = None
        if pool_n is not None:
            allowed = self.pool_mask(logits, group, n_groups, pool_n)
        r = route(logits, top_k=self.k, allowed=allowed, shared=self.shared if self.s else None)
        k = r.indices.shape[1]
        flat_e = r.indices.reshape(-1)
        flat_w = r.weights.reshape(-1)
        tok = torch.arange(T).repeat_interleave(k)
        order = torch.argsort(flat_e, stable=True)
        counts = torch.bincount(flat_e, minlength=self.E).tolist()
        xs = x[tok[order]]
        ys = []
        for e, chunk in enumerate(torch.split(xs, counts)):
            if counts[e]:
                ys.append(swiglu(chunk, self.w_gate[e], self.w_up[e], self.w_down[e]))
        y = torch.cat(ys) * flat_w[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, tok[order], y)
        # load balance over all tokens of the batch (routed experts only)
        R = self.E - self.s
        routed_sel = flat_e < R
        f = torch.bincount(flat_e[routed_sel], minlength=self.E)[:R].float()
        f = f / f.sum().clamp_min(1)
        P = r.probs[:, :R].mean(0)
        lb = R * (f * P).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return out, {"lb": lb, "z": z, "probs": r.probs.detach()}


class Block(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.pre_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MoE(c)


class EmoTrainModel(nn.Module):
    def __init__(self, c: TrainConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        g = torch.Generator().manual_seed(0)
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("o_proj.weight") or name.endswith("w_down"):
                nn.init.normal_(p, 0.0, out_std, generator=g)
            else:
                nn.init.normal_(p, 0.0, std, generator=g)

    def forward(self, input_ids: Tensor, mask: Tensor, group: Tensor | None = None,
                pool_n: Tensor | None = None, collect_probs: bool = False):
        """input_ids/mask [B, S]; group [B] document id per sequence (0..G-1), pool_n [G]
        pool size per document (non-shared experts) or None for unrestricted routing.
        Returns (logits [B, S, V], aux)."""
        c = self.config
        B, S = input_ids.shape
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(c.head_dim, torch.arange(S), c.rope_theta)
        flat_mask = mask.reshape(-1)
        tok_group = None
        n_groups = 0
        if group is not None:
            tok_group = group[:, None].expand(B, S).reshape(-1)[flat_mask]
            n_groups = int(group.max()) + 1
        lb = h.new_zeros(())
        z = h.new_zeros(())
        probs = []
        for layer in self.layers:
            h = h + layer.self_attn(layer.pre_attention_layernorm(h), cos, sin)
            x = layer.pre_feedforward_layernorm(h).reshape(B * S, -1)
            xm = x[flat_mask]
            y, aux = layer.mlp(xm, tok_group, n_groups, pool_n)
            full = torch.zeros_like(x).index_put((flat_mask.nonzero().squeeze(1),), y)
            h = h + full.view(B, S, -1)
            lb = lb + aux["lb"]
            z = z + aux["z"]
            if collect_probs:
                probs.append(aux["probs"])
        logits = self.lm_head(self.norm(h))
        L = len(self.layers)
        return logits, {"lb": lb / L, "z": z / L, "probs": probs}

    def export_tensors(self, dtype=torch.bfloat16) -> dict[str, Tensor]:
        """Tensors named as docs/formats.md's EMO section, one tensor per expert."""
        out = {
            "model.embed_tokens.weight": self.embed_tokens.weight,
            "model.norm.weight": self.norm.weight,
            "lm_head.weight": self.lm_head.weight,
        }
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(layer.self_attn, n).weight
            out[p + "pre_attention_layernorm.weight"] = layer.pre_attention_layernorm.weight
            out[p + "pre_feedforward_layernorm.weight"] = layer.pre_feedforward_layernorm.weight
            out[p + "mlp.gate.weight"] = layer.mlp.gate.weight
            for j in range(layer.mlp.E):
                out[p + f"mlp.experts.{j}.gate_proj.weight"] = layer.mlp.w_gate[j]
                out[p + f"mlp.experts.{j}.up_proj.weight"] = layer.mlp.w_up[j]
                out[p + f"mlp.experts.{j}.down_proj.weight"] = layer.mlp.w_down[j]
        return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}
