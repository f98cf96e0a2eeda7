"""Optional weight-only int8 (per output channel), made lazily on first use.

Decoding is bound by the bytes of weights read per token; int8 halves them.
It is an *option* (`load_model(..., quantize="int8")`): the default path reads
the checkpoint's own bf16 bytes and is exact. Each matrix is quantized the
first time a forward pass uses it, so unused experts are never read; the
mapped bf16 pages it was made from are then dropped (madvise), so resident
memory holds the int8 copy alone. The router stays in the checkpoint's dtype:
expert choice must not move.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import torch
from torch import Tensor

_libc = ctypes.CDLL(None, use_errno=True)
_ROWS = 8192  # quantize this many rows at a time: bounded float32 scratch


@dataclass
class Int8Weight:
    q: Tensor  # [N, K] int8
    scales: Tensor  # [N] in the activation dtype

    @classmethod
    def from_weight(cls, w: Tensor, act_dtype: torch.dtype) -> "Int8Weight":
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for a in range(0, w.shape[0], _ROWS):
            wf = w[a:a + _ROWS].float()
            s = wf.abs().amax(1).clamp_min(1e-12) / 127.0
            q[a:a + _ROWS] = (wf / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            scales[a:a + _ROWS] = s
        return cls(q, scales.to(act_dtype))


def drop_pages(t: Tensor, mapped: list[tuple[int, int]]) -> None:
    """Give back the resident pages of a view of a mapped checkpoint file.

    Only inside a file mapping: there a dropped page is read again from the
    file if ever touched; in anonymous memory it would come back as zeros.
    """
    if t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mapped):
        return
    a = -(-start // page) * page  # only whole pages that belong to this tensor
    b = (end // page) * page
    if b > a:
        _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc `malloc_trim`).

    Repacking a matrix allocates transients several times its packed size. Once
    glibc has freed a few large blocks it raises its mmap threshold, so later
    transients of the same size come from the heap, and their pages stay
    resident after `free`: serving two int4 profiles reached 3.6x the bytes of
    their weights. Called after each repack (once per matrix); a no-op where the
    C library has no malloc_trim."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class Int8Cache:
    def __init__(self, act_dtype: torch.dtype, mapped: list[tuple[int, int]]):
        self.act_dtype = act_dtype
        self.mapped = mapped  # address ranges of the checkpoint mappings
        self._w: dict[tuple[int, tuple[int, ...]], Int8Weight] = {}

    def get(self, w: Tensor) -> Int8Weight:
        key = (w.data_ptr(), tuple(w.shape))
        q = self._w.get(key)
        if q is None:
            q = self._w[key] = Int8Weight.from_weight(w, self.act_dtype)
            drop_pages(w, self.mapped)
            release_freed_heap()
        return q

    def linear(self, x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        q = self.get(w)
        y = torch._weight_int8pack_mm(x.contiguous(), q.q, q.scales)
        return y if bias is None else y + bias

    def nbytes(self) -> int:
        return sum(v.q.numel() + v.scales.numel() * v.scales.element_size() for v in self._w.values())
