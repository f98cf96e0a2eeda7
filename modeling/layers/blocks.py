"""Stateless building blocks shared by inference (`modeling.transformer`) and training.

Each function follows docs/formats.md to the letter: RMSNorm computes in float32
and casts back; RoPE uses the rotate-half convention with float32 frequencies;
experts are SwiGLU (down(silu(gate(x)) * up(x))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _normalised(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, in float32."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in float32, cast back to the input dtype, then scaled."""
    return weight * _normalised(x, eps).to(x.dtype)


def rms_norm_offset(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm whose weight is stored zero-centred (Qwen3-Next, Qwen3.5): scaled by
    1 + w, all in float32, then cast back (as transformers' Qwen3NextRMSNorm)."""
    return (_normalised(x, eps) * (1.0 + weight.float())).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True)
class RopeConfig:
    """RoPE as config.json states it (transformers 5 `rope_parameters`, or the older
    top-level `rope_theta` / `partial_rotary_factor` / `rope_scaling`)."""

    type: str = "default"
    theta: float = 10000.0
    partial_rotary_factor: float = 1.0  # rotate only the first head_dim * factor dims (GLM)
    params: dict = field(default_factory=dict, hash=False, compare=False)  # the rest, for other types

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)


def _default_inv_freq(rope: RopeConfig, dim: int) -> tuple[Tensor, float]:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers 5 computes it (`_compute_yarn_parameters`):
    frequencies blended between interpolated (/ factor) and extrapolated along a
    linear ramp between the correction dims of beta_fast and beta_slow rotations
    over the original context, and cos/sin scaled by the attention factor
    (0.1 ln(factor) + 1 unless given, or the mscale ratio). config.py has checked
    `factor` and `original_max_position_embeddings`."""
    p = rope.params
    base, factor = rope.theta, float(p["factor"])
    original = p["original_max_position_embeddings"]

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp  # share of each frequency kept as trained
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


# RoPE variants: type -> fn(rope, rotary_dim) -> (inverse frequencies [dim/2] float32, attention scaling
# of cos/sin). A new type is one more entry; config.py refuses types not listed here.
ROPE_TYPES: dict[str, Callable[[RopeConfig, int], tuple[Tensor, float]]] = {
    "default": _default_inv_freq, "yarn": _yarn_inv_freq}


def rope_tables(rope: RopeConfig, head_dim: int, positions: Tensor,
                freqs: tuple[Tensor, float] | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[len(positions), rotary_dim]` in float32 for any supported RoPE type. `freqs`: the
    type's (inverse frequencies, scaling) when the caller keeps them (they depend on the config only)."""
    inv_freq, scaling = freqs if freqs is not None else ROPE_TYPES[rope.type](rope, rope.rotary_dim(head_dim))
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    if scaling == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scaling, emb.sin() * scaling


def rope_cos_sin(head_dim: int, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[len(positions), head_dim]` in float32 (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: `[..., seq, head_dim]`; cos/sin: `[seq, rotary_dim]` float32.

    The rotation runs in x's dtype with cos/sin cast to it, as the reference
    implementations do (the tables themselves are computed in float32). With
    partial RoPE (rotary_dim < head_dim) the remaining dims pass unrotated.
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def swiglu(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)); weights in nn.Linear layout."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
