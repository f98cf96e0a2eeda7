"""Quantizing matrices into compressed-tensors' pack-quantized tensors, and which
tensors of a checkpoint are quantized.

The arithmetic (min/max to scale and zero point, rounding, clamping, packing)
is compressed-tensors' own (`calculate_qparams`, `PackedQuantizationCompressor`),
so what we write is what llm-compressor would write for the same scheme.
Only linear layers are quantized: attention projections, routed experts,
dense and shared MLPs, and optionally lm_head. The router, norms, embeddings
and correction biases keep the checkpoint's dtype (expert choice must not move).
"""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import Tensor

from ..names import TensorNames
from .scheme import QuantizationError, WeightScheme

_LINEAR_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_quantized_linear(name: str, names: TensorNames, lm_head: bool = False) -> bool:
    """Whether `name` is a linear weight the quantized checkpoint stores packed."""
    if name == names.lm_head:
        return lm_head
    if not name.endswith(".weight") or names.layer_of(name) is None:
        return False
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return module in _LINEAR_PROJ or module in names.expert_parts


def ignore_list(names: TensorNames, lm_head: bool) -> list[str]:
    """compressed-tensors' `ignore`: the Linear modules left in the original dtype
    (module names as transformers builds them)."""
    out = [f"re:.*{re.escape(names.moe_module)}\\.gate$"]
    if names.fused_moe_module != names.moe_module:
        out.append(f"re:.*{re.escape(names.fused_moe_module)}\\.gate$")
    if not lm_head:
        out.append("lm_head")
    return out


def quantize_matrix(name: str, w: Tensor, scheme: WeightScheme) -> list[tuple[str, Tensor]]:
    """`module.weight` -> [(module.weight_packed, ...), (module.weight_scale, ...), ...].

    Scales are stored in the weight's dtype and the weights are rounded with the
    stored scales, so dequantizing the file reproduces what was computed here."""
    from compressed_tensors.compressors import PackedQuantizationCompressor  # imports transformers: writing only
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme.check_shape(name, tuple(w.shape))
    if not w.is_floating_point():
        raise ValueError(f"{name}: cannot quantize a {w.dtype} tensor")
    N, K = w.shape
    g = scheme.group_size or K
    wf = w.float()
    grouped = wf.view(N, K // g, g)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.ct_args())
    scale = scale.to(w.dtype)
    sd = {"weight": wf, "weight_scale": scale.float(), "weight_zero_point": zp}
    packed = PackedQuantizationCompressor.compress(sd, scheme.ct_scheme())
    prefix = name[: -len("weight")]
    out = [(prefix + "weight_packed", packed["weight_packed"]),
           (prefix + "weight_scale", scale.contiguous())]
    if not scheme.symmetric:
        out.append((prefix + "weight_zero_point", packed["weight_zero_point"]))
    out.append((prefix + "weight_shape", packed["weight_shape"].to(torch.int64)))
    return out


def quantized_tensors(items: Iterator[tuple[str, Tensor]], names: TensorNames, scheme: WeightScheme,
                      lm_head: bool = False) -> Iterator[tuple[str, Tensor]]:
    """A stream of (name, tensor) with its linear weights quantized, one at a time
    (the writer's memory stays bounded by a shard, whatever the model's size)."""
    for name, t in items:
        if is_quantized_linear(name, names, lm_head):
            yield from quantize_matrix(name, t, scheme)
        else:
            yield name, t


def check_config(cfg, scheme: WeightScheme) -> None:
    """Refuse, before anything is written, a scheme whose group does not divide
    the input dimension of every matrix it would quantize."""
    if scheme.group_size is None:
        return
    inputs = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_heads * head_dim": cfg.num_heads * cfg.head_dim}
    if cfg.dense_intermediate_size:
        inputs["dense_intermediate_size"] = cfg.dense_intermediate_size
    if cfg.shared_mlp_size:
        inputs["shared expert size"] = cfg.shared_mlp_size
    for what, k in inputs.items():
        if k % scheme.group_size:
            raise QuantizationError(f"group size {scheme.group_size} does not divide the input dimension {what} = {k}")
