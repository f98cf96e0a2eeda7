"""Expert kinds: what one expert computes, chosen by the family (`ModelConfig.expert_mlp`).

Layouts the readers hand over (`weights.Expert`): gate and up as separate
matrices, fused back to back (`gate_up` [2I, H], one product), or interleaved
(gpt-oss: gate = rows 0::2 of `gate_up`), with or without biases. A kind is its
activation over those: `forward` for the torch path and `native_act` for the
native fused MoE call (`Kernels.moe`; None: plain SwiGLU). A new kind is a
subclass registered in `EXPERT_KINDS` under the word a family's `expert_mlp` names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.mxfp4 import DequantCache, gemv as mxfp4_gemv

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import Transformer
    from ..io.weights import Expert


class ExpertKind:
    def forward(self, tr: Transformer, e: Expert, x: Tensor) -> Tensor:
        """One expert on `x` `[T, H]`; dense products through `tr._linear` (kernels, int8)."""
        raise NotImplementedError

    def native_act(self, cfg: ModelConfig) -> tuple[float, float] | None:
        """The activation's parameters for the native MoE kernel (None: SwiGLU)."""
        return None


class SwiGLU(ExpertKind):
    """down(silu(gate x) * up x): every family but gpt-oss, and every dense or shared MLP."""

    def forward(self, tr: Transformer, e: Expert, x: Tensor) -> Tensor:
        return expert_forward(e, x, tr._linear)


class ClampedSwiGLU(ExpertKind):
    """gpt-oss: interleaved gate/up with biases, clamped, (up + 1) * gate * sigmoid(alpha gate);
    weights float or MXFP4 (dequantized per use)."""

    def forward(self, tr: Transformer, e: Expert, x: Tensor) -> Tensor:
        ex = tr.cfg.extra
        linear = F.linear if e.mx_gate_up is not None else tr._linear
        return clamped_swiglu_expert(e, x, ex["swiglu_alpha"], ex["swiglu_limit"], linear, tr.mxfp4_cache,
                                     fused_decode=tr.compile_decode)

    def native_act(self, cfg: ModelConfig) -> tuple[float, float]:
        return cfg.extra["swiglu_alpha"], cfg.extra["swiglu_limit"]


SWIGLU = SwiGLU()
EXPERT_KINDS: dict[str, ExpertKind] = {"swiglu": SWIGLU, "clamped_swiglu": ClampedSwiGLU()}


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
