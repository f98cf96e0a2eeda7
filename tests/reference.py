"""An independent float64 reference of EMO / OLMoE, written from docs/formats.md.

It shares no code with `modeling/`: it reads tensors with the `safetensors`
library, parses config.json itself, and computes token by token in numpy
float64 with plain loops, choosing for clarity over speed. Expert ids are the
checkpoint's own (local) ids; a pool is a {layer: [ids]} of those.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open


def _load_tensors(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as sf:
            for name in sf.keys():
                out[name] = sf.get_tensor(name).double().numpy()
    return out


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _softmax(z: np.ndarray) -> np.ndarray:
    if np.all(np.isneginf(z)):
        return np.zeros_like(z)
    z = z - np.max(z)
    e = np.exp(z)
    return e / e.sum()


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _topk(p: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[int]:
    order = [int(i) for i in np.argsort(-p, kind="stable") if int(i) not in exclude]
    return order[:k]


class Reference:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.cfg = json.loads((self.folder / "config.json").read_text())
        self.t = _load_tensors(self.folder)

    def _layer_info(self, i: int) -> tuple[int, int, list[int]]:
        c = self.cfg
        L = c["num_hidden_layers"]
        E = (c.get("num_experts_per_layer") or [c.get("num_experts", 0)] * L)[i]
        s = (c.get("num_shared_experts_per_layer") or [c.get("num_shared_experts", 0) or 0] * L)[i]
        aa = (c.get("always_active_experts_per_layer") or [c.get("always_active_experts") or []] * L)[i] or []
        return E, s, list(aa)

    def moe(self, i: int, h: np.ndarray, pool: list[int] | None) -> np.ndarray:
        c, t = self.cfg, self.t
        p = f"model.layers.{i}.mlp"
        E, s, aa = self._layer_info(i)
        logits = t[f"{p}.gate.weight"] @ h
        if pool is not None:
            logits = np.where(np.isin(np.arange(E), pool), logits, -np.inf)
        k = min(c["num_experts_per_tok"], E)
        if s > 0:
            first, last = _softmax(logits[: E - s]), _softmax(logits[E - s:])
            chosen = [(j, first[j]) for j in _topk(first, k - s)]
            chosen += [(E - s + j, last[j]) for j in _topk(last, s)]
        else:
            prob = _softmax(logits)
            extra = _topk(prob, k - len(aa), exclude=set(aa))
            chosen = [(j, prob[j]) for j in list(aa) + extra]
            if c.get("norm_topk_prob"):
                tot = sum(w for _, w in chosen)
                chosen = [(j, w / tot) for j, w in chosen]
        out = np.zeros_like(h)
        for j, w in chosen:
            if w == 0:
                continue
            e = f"{p}.experts.{j}"
            if f"{e}.gate_proj.weight" in t:
                g, u, d = t[f"{e}.gate_proj.weight"], t[f"{e}.up_proj.weight"], t[f"{e}.down_proj.weight"]
            else:
                I = c["intermediate_size"]
                gu = t[f"{p}.experts.gate_up_proj"][j]
                g, u, d = gu[:I], gu[I:], t[f"{p}.experts.down_proj"][j]
            out += w * (d @ (_silu(g @ h) * (u @ h)))
        return out

    def dense(self, i: int, h: np.ndarray) -> np.ndarray:
        t, p = self.t, f"model.layers.{i}.mlp"
        b = (lambda n: t.get(f"{p}.{n}_proj.bias", 0.0))
        g = t[f"{p}.gate_proj.weight"] @ h + b("gate")
        u = t[f"{p}.up_proj.weight"] @ h + b("up")
        return t[f"{p}.down_proj.weight"] @ (_silu(g) * u) + b("down")

    def logits(self, ids: list[int], pool: dict[int, list[int]] | None = None) -> np.ndarray:
        c, t = self.cfg, self.t
        olmoe = c["model_type"] == "olmoe"
        H, nh = c["hidden_size"], c["num_attention_heads"]
        nkv = c.get("num_key_value_heads") or nh
        D = c.get("head_dim") or H // nh
        eps = c.get("rms_norm_eps", 1e-6 if not olmoe else 1e-5)
        theta = c.get("rope_theta", 10000.0)
        clip = c.get("clip_qkv")
        T = len(ids)
        x = t["model.embed_tokens.weight"][ids]  # [T, H]
        inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
        ang = np.arange(T)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

        def rope(v):  # [T, D]
            half = D // 2
            rot = np.concatenate([-v[:, half:], v[:, :half]], 1)
            return v * cos + rot * sin

        an, mn = ("input_layernorm", "post_attention_layernorm") if olmoe else ("pre_attention_layernorm", "pre_feedforward_layernorm")
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            h = _rms(x, t[f"{p}.{an}.weight"], eps)
            q = h @ t[f"{p}.self_attn.q_proj.weight"].T
            k = h @ t[f"{p}.self_attn.k_proj.weight"].T
            v = h @ t[f"{p}.self_attn.v_proj.weight"].T
            if olmoe:
                q = _rms(q, t[f"{p}.self_attn.q_norm.weight"], eps)
                k = _rms(k, t[f"{p}.self_attn.k_norm.weight"], eps)
            if clip is not None:
                q, k, v = np.clip(q, -clip, clip), np.clip(k, -clip, clip), np.clip(v, -clip, clip)
            att = np.zeros((T, nh * D))
            for hd in range(nh):
                kv = hd // (nh // nkv)
                qh, kh, vh = rope(q[:, hd * D:(hd + 1) * D]), rope(k[:, kv * D:(kv + 1) * D]), v[:, kv * D:(kv + 1) * D]
                for a in range(T):
                    sc = kh[: a + 1] @ qh[a] / np.sqrt(D)
                    att[a, hd * D:(hd + 1) * D] = _softmax(sc) @ vh[: a + 1]
            x = x + att @ t[f"{p}.self_attn.o_proj.weight"].T
            h = _rms(x, t[f"{p}.{mn}.weight"], eps)
            E, _, _ = self._layer_info(i)
            if E == 0:
                x = x + np.stack([self.dense(i, h[a]) for a in range(T)])
            else:
                lp = None if pool is None else pool.get(i)
                x = x + np.stack([self.moe(i, h[a], lp) for a in range(T)])
        x = _rms(x, t["model.norm.weight"], eps)
        head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
        return x @ head.T
