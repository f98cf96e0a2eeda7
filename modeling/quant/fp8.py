"""Block-scaled FP8 weights (DeepSeek-V3, Kimi-K2, Qwen3 FP8 releases): zero-copy views, dequantized per use.

Such a checkpoint's `config.json` says `quantization_config: {"quant_method": "fp8",
"weight_block_size": [128, 128], ...}` and stores a linear weight `X.weight` as
float8_e4m3fn `[N, K]` beside `X.weight_scale_inv` float32 `[ceil(N/bn), ceil(K/bk)]`:
the value of element (r, c) is `weight[r, c] * scale_inv[r // bn, c // bk]`.
Embeddings, norms, routers and the lm head stay in the checkpoint's float dtype.

`Fp8Matrix` holds views of the mapped file (nothing is read at load); `dequantize`
expands one matrix when a forward pass uses it, as transformers' `Fp8Dequantize`
does on a machine without FP8 kernels (both operands in float32, one product, then
the cast), so the values are equal bit for bit. Profiles copy the FP8 bytes and
their scales as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP8_DTYPES = (torch.float8_e4m3fn,)
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
DEFAULT_BLOCK = (128, 128)


class Fp8Error(ValueError):
    """An FP8 weight whose scales are missing or do not fit its block grid."""


def parse_fp8_config(qc) -> tuple[int, int] | None:
    """The block size of a `quant_method: fp8` quantization_config (None: not FP8)."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise Fp8Error(f"FP8 activation_scheme {qc.get('activation_scheme')!r} is not supported (only 'dynamic': "
                       f"weights are dequantized, activations stay in the compute dtype)")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise Fp8Error(f"FP8 fmt {fmt!r} is not supported (only 'e4m3')")
    block = qc.get("weight_block_size") or DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise Fp8Error(f"FP8 weight_block_size {block!r} is not two positive integers")
    return int(block[0]), int(block[1])


@dataclass(eq=False)
class Fp8Matrix:
    """One FP8 linear weight `[N, K]` (nn.Linear layout) and its block scales, as stored."""

    weight: Tensor  # float8_e4m3fn [N, K]
    scale_inv: Tensor  # float [ceil(N / block[0]), ceil(K / block[1])]
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def tensors(self) -> list[Tensor]:
        return [self.weight, self.scale_inv]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The matrix in `dtype`: float32(weight) x float32(scale of its block), then cast."""
        (N, K), (bn, bk) = self.weight.shape, self.block
        s = self.scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
        return (self.weight.float() * s).to(dtype)


def fp8_matrix(name: str, weight: Tensor, scale_inv: Tensor | None, block: tuple[int, int]) -> Fp8Matrix:
    """Check an FP8 weight and its scales; Fp8Error names what is wrong."""
    if scale_inv is None:
        raise Fp8Error(f"tensor {name + SCALE_SUFFIX!r} is missing (the FP8 weight {name!r} needs its block scales)")
    if weight.dim() != 2:
        raise Fp8Error(f"FP8 tensor {name!r} has shape {list(weight.shape)}; only 2-D linear weights are block-scaled")
    N, K = weight.shape
    grid = (-(-N // block[0]), -(-K // block[1]))
    if tuple(scale_inv.shape) != grid or not scale_inv.is_floating_point():
        raise Fp8Error(f"tensor {name + SCALE_SUFFIX!r} is {scale_inv.dtype} {list(scale_inv.shape)}; "
                       f"{list(weight.shape)} in {list(block)} blocks needs float {list(grid)}")
    return Fp8Matrix(weight, scale_inv, block)
