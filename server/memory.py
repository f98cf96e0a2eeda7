"""How much of a set of tensors is resident in RAM (mincore over their pages).

Weights are views of memory-mapped files: mapped is not resident. The kernel
knows which pages of a mapping are in memory; `mincore(2)` asks it, without
touching (and so without reading) any page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np
import torch

from modeling.io.pinning import page_ranges

_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _mincore = _libc.mincore
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    _mincore.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: report nothing as known
    _mincore = None


def resident_bytes(tensors: list[torch.Tensor]) -> tuple[int, int] | None:
    """(resident bytes, mapped bytes) of the pages under `tensors`; None when unknown
    (no mincore, or tensors on an accelerator)."""
    if _mincore is None or any(t is not None and t.device.type != "cpu" for t in tensors):
        return None
    resident = total = 0
    for a, b in page_ranges(tensors):
        n = (b - a) // _PAGE
        vec = (ctypes.c_ubyte * n)()
        if _mincore(ctypes.c_void_p(a), b - a, vec) != 0:
            return None
        resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * _PAGE
        total += b - a
    return resident, total


def process_rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
