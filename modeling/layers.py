"""Stateless building blocks shared by inference (`modeling.model`) and training.

Each function follows emo-format.md to the letter: RMSNorm computes in float32
and casts back; RoPE uses the rotate-half convention with float32 frequencies;
experts are SwiGLU (down(silu(gate(x)) * up(x))).
"""

from __future__ import annotations

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
    """x: `[..., seq, head_dim]`; cos/sin: `[seq, head_dim]` float32.

    The rotation runs in x's dtype with cos/sin cast to it, as the reference
    implementations do (the tables themselves are computed in float32).
    """
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def swiglu(x: Tensor, gate_w: Tensor, up_w: Tensor, down_w: Tensor) -> Tensor:
    """One SwiGLU expert: down(silu(gate(x)) * up(x)); weights in nn.Linear layout."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
