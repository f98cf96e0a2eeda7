"""Serving compressed-tensors pack-quantized weights.

A `PackedLinear` holds views of the mapped checkpoint (`weight_packed`,
`weight_scale`, `weight_zero_point`): opening a quantized checkpoint reads
nothing. The CPU kernels want their own layouts (`torch._weight_int8pack_mm`:
int8 [N, K] and one scale per row; `aten._weight_int4pack_mm_for_cpu`: its
tiled int4 packing and [K / group, N, 2] scales and zeros), so the first
forward pass that uses a matrix repacks it once and drops the mapped pages it
was read from (madvise): resident memory holds each used matrix once, at its
quantized size, and an unused expert is never read. Where no kernel fits (an
accelerator, an int8 scheme with zero points, a group size the int4 kernel
does not take) the matrix is dequantized once to the activation dtype.

Unpacking is a few shifts and masks of the documented layout (element i at
bits [i * bits, (i + 1) * bits) of the little-endian int32 stream, offset by
2^(bits-1)); tests check it against compressed-tensors' `unpack_from_int32`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .lazy_int8 import drop_pages, release_freed_heap
from .scheme import WeightScheme


def unpack(packed: Tensor, bits: int, rows: int, cols: int) -> Tensor:
    """int32 [rows, ceil(cols * bits / 32)] -> unsigned values [rows, cols] (int16, 0 .. 2^bits - 1)."""
    b = packed.contiguous().view(torch.uint8).view(rows, -1)
    if bits == 8:
        return b[:, :cols].to(torch.int16)
    # bits == 4: low nibble first
    return torch.stack((b & 0xF, b >> 4), dim=-1).view(rows, -1)[:, :cols].to(torch.int16)


class PackedLinear:
    """One pack-quantized linear weight `[N, K]`, made runnable on first use."""

    def __init__(self, name: str, scheme: WeightScheme, shape: tuple[int, int], packed: Tensor, scale: Tensor,
                 zero_point: Tensor | None, mapped: list[tuple[int, int]]):
        self.name, self.scheme, self.shape = name, scheme, tuple(shape)
        self.packed, self.scale, self.zero_point = packed, scale, zero_point
        self.mapped = mapped  # address ranges of the checkpoint mappings (pages we may drop)
        self.device = packed.device
        self._run: Callable[[Tensor], Tensor] | None = None
        self._held: list[Tensor] = []  # what the kernel reads once prepared
        self.native = None  # the native kernels' Matrix for it (modeling.kernels.native_matrix), made once

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    # -- the stored values ----------------------------------------------------------
    def int_values(self) -> Tensor:
        """Signed integer weights [N, K] (int16), as quantized."""
        N, K = self.shape
        return unpack(self.packed, self.scheme.bits, N, K) - (1 << (self.scheme.bits - 1))

    def zero_points(self) -> Tensor | None:
        """[N, groups] signed zero points (stored packed along the output dimension)."""
        if self.zero_point is None:
            return None
        N = self.shape[0]
        G = self.scale.shape[1]
        zp = unpack(self.zero_point.t(), self.scheme.bits, G, N).t()
        return zp - (1 << (self.scheme.bits - 1))

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as compressed-tensors defines it: (q - zero_point) * scale."""
        N, K = self.shape
        G = self.scale.shape[1]
        q = self.int_values().float().view(N, G, K // G)
        zp = self.zero_points()
        if zp is not None:
            q = q - zp.float()[:, :, None]
        w = (q * self.scale.float()[:, :, None]).view(N, K)
        return w.to(dtype or self.scale.dtype)

    def nbytes(self) -> int:
        """Bytes stored in the checkpoint."""
        ts = [self.packed, self.scale] + ([self.zero_point] if self.zero_point is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def tensors(self) -> list[Tensor]:
        """What backs this weight now: the mapped views, or the repacked copy once used (ATen's, or the
        native kernels' interleaved one)."""
        if self._held:
            return list(self._held)
        if self.native is not None and self.native.interleaved:
            return list(self.native.tensors())
        return [t for t in (self.packed, self.scale, self.zero_point) if t is not None]

    # -- running --------------------------------------------------------------------
    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        if self._run is None:
            self._prepare(x.dtype)
        y = self._run(x)
        return y if bias is None else y + bias

    def prepare(self, act_dtype: torch.dtype) -> None:
        """Repack for the kernel now (otherwise done by the first `linear`)."""
        if self._run is None:
            self._prepare(act_dtype)

    def _prepare(self, act_dtype: torch.dtype) -> None:
        s = self.scheme
        cpu = self.device.type == "cpu"
        if cpu and s.bits == 8 and s.group_size is None and self.zero_point is None:
            self._prepare_int8(act_dtype)
        elif cpu and s.bits == 4 and s.group_size in (32, 64, 128, 256) and self.shape[1] % s.group_size == 0 \
                and self.shape[0] % 16 == 0:
            self._prepare_int4(act_dtype)
        else:
            w = self.dequantize(act_dtype)
            self._held = [w]
            self._run = lambda x: F.linear(x, w)
        for t in (self.packed, self.zero_point):
            if t is not None:
                drop_pages(t, self.mapped)
        release_freed_heap()  # the unpacking transients, or they stay resident

    def _prepare_int8(self, act_dtype: torch.dtype) -> None:
        N, K = self.shape
        # stored byte = q + 128; flipping the top bit gives q as a signed byte
        q = (unpack(self.packed, 8, N, K).to(torch.uint8) ^ 0x80).view(torch.int8).contiguous()
        scales = self.scale.reshape(N).to(act_dtype).contiguous()
        self._held = [q, scales]
        self._run = lambda x: torch._weight_int8pack_mm(x.contiguous(), q, scales)

    def _prepare_int4(self, act_dtype: torch.dtype) -> None:
        N, K = self.shape
        g = self.scheme.group_size
        u = unpack(self.packed, 4, N, K).to(torch.int32)  # q + 8
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        scale = self.scale.float()  # [N, G]
        zp = self.zero_points()
        # the kernel computes (u - 8) * scale + zero = q * scale + zero; compressed-tensors'
        # (q - zp) * scale needs zero = -zp * scale
        zero = torch.zeros_like(scale) if zp is None else -zp.float() * scale
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(act_dtype).contiguous()  # [G, N, 2]
        self._held = [w, sz]
        self._run = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w, g, sz)
