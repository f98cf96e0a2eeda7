"""Keeping the weights a profile serves in memory (`emo-serve --mlock`).

Weights are views of memory-mapped files, so under memory pressure the kernel
may evict their pages and the next token reads them from disk again (decode
then runs at disk speed). As llama.cpp's `--mlock` does, `pin` locks the pages
of the base weights and of the experts a set of pools uses (`mlock(2)`); where
locking is not allowed (RLIMIT_MEMLOCK, no CAP_IPC_LOCK) it pre-faults them
(`MADV_POPULATE_READ`, else a read of every page) and says so. Quantized
matrices are repacked up front instead: their kernel copy lives in anonymous
memory, which page-cache pressure does not evict.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import torch
from torch import Tensor

_PAGE = mmap.PAGESIZE
_MADV_POPULATE_READ = 22  # Linux 5.14+
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def page_ranges(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Merged, page-aligned [start, end) address ranges of CPU tensors."""
    spans = sorted(((t.data_ptr() // _PAGE) * _PAGE, -(-(t.data_ptr() + t.numel() * t.element_size()) // _PAGE) * _PAGE)
                   for t in tensors if t is not None and t.device.type == "cpu" and t.numel())
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def pin(tensors: list[Tensor]) -> dict:
    """Lock (or, failing that, pre-fault) the pages under `tensors`. Returns
    {"method": "mlock" | "populate" | "read", "bytes": n, "error": why mlock failed}."""
    ranges = page_ranges(tensors)
    total = sum(b - a for a, b in ranges)
    err = None
    for a, b in ranges:
        if _libc.mlock(ctypes.c_void_p(a), ctypes.c_size_t(b - a)) != 0:
            err = os.strerror(ctypes.get_errno())
            for a2, b2 in ranges:  # all or nothing: unlock what was locked
                if a2 >= a:
                    break
                _libc.munlock(ctypes.c_void_p(a2), ctypes.c_size_t(b2 - a2))
            break
    if err is None:
        return {"method": "mlock", "bytes": total}
    method = "populate"
    for a, b in ranges:
        if _libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_POPULATE_READ) != 0:
            method = "read"
            break
    if method == "read":  # one byte of every page
        for t in tensors:
            if t is not None and t.device.type == "cpu" and t.numel():
                flat = t.reshape(-1).view(torch.uint8) if t.is_contiguous() else t.contiguous().view(-1).view(torch.uint8)
                int(flat[:: _PAGE].sum())
    return {"method": method, "bytes": total, "error": f"mlock: {err}"}
