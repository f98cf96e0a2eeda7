"""Stateless building blocks shared by inference (`modeling.model`) and training.

Each function follows docs/formats.md to the letter: RMSNorm computes in float32
and casts back; RoPE uses the rotate-half convention with float32 frequencies;
experts are SwiGLU (down(silu(gate(x)) * up(x))).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in float32, cast back to the input dtype, then scaled."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


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


# RoPE variants: type -> fn(rope, rotary_dim) -> (inverse frequencies [dim/2] float32, attention scaling
# of cos/sin). A new type (YaRN for gpt-oss) is one more entry; config.py refuses types not listed here.
ROPE_TYPES: dict[str, Callable[[RopeConfig, int], tuple[Tensor, float]]] = {"default": _default_inv_freq}


def rope_tables(rope: RopeConfig, head_dim: int, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[len(positions), rotary_dim]` in float32 for any supported RoPE type."""
    inv_freq, scaling = ROPE_TYPES[rope.type](rope, rope.rotary_dim(head_dim))
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
