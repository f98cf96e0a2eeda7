"""MXFP4 weights (OCP Microscaling Formats v1.0): zero-copy views, dequantized on use.

An MXFP4 matrix `[rows, cols]` is stored as two tensors, as gpt-oss's hub
checkpoints keep their experts:

- `*_blocks` uint8 `[..., rows, cols / 32, 16]`: each block of 32 values is 16
  bytes of 4-bit E2M1 codes, element 2j in the low nibble of byte j and
  element 2j + 1 in the high nibble;
- `*_scales` uint8 `[..., rows, cols / 32]`: one E8M0 scale per block, the
  power of two 2^(s - 127).

A code is sign (bit 3), exponent (bits 2-1, bias 1) and mantissa (bit 0):
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives. `Mxfp4Matrix` holds views of
the mapped file (nothing is read at load) and `dequantize` expands one matrix
(one expert) when a forward pass uses it, by the same lookup-and-ldexp
transformers' `integrations.mxfp4` uses, so the values are equal bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK = 32  # values per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127

_PAIRS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _pairs(dtype: torch.dtype, device: torch.device) -> Tensor:
    """[256, 2]: the (low nibble, high nibble) values of every byte."""
    key = (dtype, device)
    if key not in _PAIRS:
        lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
        _PAIRS[key] = torch.stack([lut.repeat(16), lut.repeat_interleave(16)], -1).contiguous()
    return _PAIRS[key]


def _e2m1_float32(codes: Tensor, scales: Tensor) -> Tensor:
    """4-bit codes (int32) and their blocks' E8M0 scales (int32, broadcast) -> float32,
    built from bits: E2M1 times 2^(s - 127) is a float32 with exponent field
    s + e - 1 and the code's mantissa bit on top (0.5 x 2^(s-127) for the one
    subnormal code). Exact for 2 <= s <= 252; `gemv` checks the range."""
    e, m = (codes >> 1) & 3, codes & 1
    normal = ((scales + e - 1) << 23) | (m << 22)
    half = (scales - 1) << 23
    mag = torch.where(e > 0, normal, torch.where(m > 0, half, torch.zeros_like(normal)))
    return (mag | ((codes & 8) << 28)).view(torch.float32)


def _gemv_impl(blocks: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    # [R, G, 16] codes, [R, G] scales, [G * 32] input -> [R] float32. One fused
    # pass over the 4-bit bytes once compiled: nothing of the matrix is expanded.
    R, G, B = blocks.shape
    q = blocks.to(torch.int32)
    sc = scales.to(torch.int32).unsqueeze(-1)
    xx = x.float().view(G, B, 2)
    return (_e2m1_float32(q & 15, sc) * xx[..., 0] + _e2m1_float32(q >> 4, sc) * xx[..., 1]).sum(-1).sum(-1)


_gemv = None
gemv_calls = 0  # products taken by the fused loop (tests check that decode uses it)


def gemv(x: Tensor, m: "Mxfp4Matrix", bias: Tensor | None = None) -> Tensor:
    """`x` `[1, cols]` times an MXFP4 matrix (nn.Linear layout) without expanding it:
    a TorchInductor-compiled loop over the stored bytes (compiled once per matrix
    shape), for single-sequence decode under `--compile`. Products and their sum
    are float32 of the exact dequantized values, so the result differs from
    dequantize + F.linear only by the order of accumulation. Scales outside
    [2, 252] (values that would be subnormal or overflow) take the dequantizing path."""
    global _gemv, gemv_calls
    if x.shape[0] != 1 or x.device.type != "cpu" or not m.bit_exact_scales:
        return F.linear(x, m.dequantize(x.dtype), bias)
    if _gemv is None:
        _gemv = torch.compile(_gemv_impl, dynamic=False)
    y = _gemv(m.blocks, m.scales, x[0])[None]
    gemv_calls += 1
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class Mxfp4Error(ValueError):
    """Blocks and scales that do not describe the matrix the config implies."""


def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """`[..., rows, G, 16]` codes and `[..., rows, G]` scales -> `[..., rows, G * 32]` in `dtype`.

    One gather of both values of each byte (a 256-row table), then the block's
    power of two, multiplied in float32 and rounded to `dtype` once: the same
    numbers as transformers' lookup per nibble + `torch.ldexp` (which is
    `x * 2.0 ** e`), several times faster on CPU.
    """
    *prefix, G, B = blocks.shape
    out = F.embedding(blocks.long(), _pairs(dtype, blocks.device)).view(*prefix, G, 2 * B)
    out.mul_(torch.pow(2.0, scales.float() - SCALE_BIAS).unsqueeze(-1))
    return out.view(*prefix, G * B * 2)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """`[..., rows, cols]` -> (blocks, scales), per the OCP spec: the shared scale of
    a block is 2^(floor(log2(amax)) - 2) (E2M1's largest exponent is 2), each
    value rounded to the nearest code (ties to the smaller magnitude), clamped
    to +-6. For tests and benchmarks: profiles never re-quantize."""
    *prefix, cols = w.shape
    if cols % BLOCK:
        raise Mxfp4Error(f"{cols} columns are not a multiple of {BLOCK}")
    x = w.float().reshape(*prefix, cols // BLOCK, BLOCK)
    amax = x.abs().amax(-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2, torch.zeros_like(amax))
    e = e.clamp(-SCALE_BIAS, SCALE_BIAS)
    mags = torch.tensor(FP4_VALUES[:8])
    scaled = (x.abs() / torch.ldexp(torch.ones_like(e), e.int())).clamp(max=6.0)
    code = (scaled.unsqueeze(-1) - mags).abs().argmin(-1).to(torch.uint8)  # first (smaller) on ties
    code |= (x < 0).to(torch.uint8) << 3
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (e.squeeze(-1) + SCALE_BIAS).to(torch.uint8).contiguous()


@dataclass
class Mxfp4Matrix:
    """One `[rows, cols]` matrix (nn.Linear layout: out x in) as views of its
    blocks `[rows, cols / 32, 16]` and scales `[rows, cols / 32]`."""

    blocks: Tensor
    scales: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] * BLOCK

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.blocks, self.scales, dtype)

    @cached_property
    def bit_exact_scales(self) -> bool:
        """Every scale in [2, 252], where `gemv` builds float32 weights from bits
        (read once per matrix, not at every decode step)."""
        return 2 <= int(self.scales.min()) and int(self.scales.max()) <= 252

    def tensors(self) -> list[Tensor]:
        return [self.blocks, self.scales]


def check_pair(blocks_name: str, blocks: Tensor, scales_name: str, scales: Tensor,
               shape: tuple[int, ...]) -> None:
    """`shape` is the dequantized `[..., rows, cols]` the config implies; raises an
    Mxfp4Error naming the tensor whose dtype or shape disagrees."""
    *prefix, cols = shape
    if cols % BLOCK:
        raise Mxfp4Error(f"{blocks_name}: {cols} columns are not a multiple of the MXFP4 block ({BLOCK})")
    want_b = (*prefix, cols // BLOCK, BLOCK // 2)
    want_s = (*prefix, cols // BLOCK)
    for name, t, want in ((blocks_name, blocks, want_b), (scales_name, scales, want_s)):
        if t.dtype != torch.uint8:
            raise Mxfp4Error(f"tensor {name!r} is {t.dtype}, MXFP4 {name.rsplit('_', 1)[-1]} are uint8")
        if tuple(t.shape) != tuple(want):
            raise Mxfp4Error(f"tensor {name!r} has shape {list(t.shape)}, the config implies {list(want)} "
                             f"(MXFP4 of a {list(shape)} tensor)")


class DequantCache:
    """Dequantized MXFP4 matrices, least recently used first out, within `max_bytes`.

    Off (0) by default: every use dequantizes again and resident memory stays
    the MXFP4 bytes. A budget trades memory for decode speed: the experts a
    stream keeps choosing stay expanded (a profile's experts are a few, so a
    budget of their bf16 size keeps all of them, as transformers does for the
    whole model on a CPU). Keys are the blocks' address, so two profiles sharing
    an expert share its entry.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._items: OrderedDict[tuple[int, torch.dtype], Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, m: Mxfp4Matrix, dtype: torch.dtype) -> Tensor:
        key = (m.blocks.data_ptr(), dtype)
        w = self._items.get(key)
        if w is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return w
        self.misses += 1
        w = m.dequantize(dtype)
        nb = w.numel() * w.element_size()
        if nb <= self.max_bytes:
            while self.bytes + nb > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = w
            self.bytes += nb
        return w
