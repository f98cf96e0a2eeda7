"""An optional compiled kernel for the decode hot path: one token times a bf16 matrix.

Decoding one sequence multiplies a single row by each weight matrix (a GEMV),
which is bound by reading the matrix. PyTorch's eager bf16 GEMV on CPU reads
at roughly half of what the memory system gives; the same product written as
a fused multiply-and-reduce and compiled by TorchInductor streams the matrix
once with vector instructions and gets much closer. It is opt-in (as in
gpt-fast, `--compile`): the first call per matrix shape compiles (seconds,
cached on disk by Inductor), and results differ from F.linear only by the
order of float32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_gemv = None


def _gemv_impl(x: Tensor, w: Tensor) -> Tensor:
    # [K] x [N, K] -> [N]; accumulate in float32, as F.linear does.
    return (w.float() * x.float()).sum(-1).to(x.dtype)


def compiled_gemv():
    global _gemv
    if _gemv is None:
        _gemv = torch.compile(_gemv_impl, dynamic=False)
    return _gemv


def linear_decode(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, through the compiled GEMV when `x` is one bf16 row on the CPU."""
    if x.shape[0] == 1 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and w.dtype == torch.bfloat16:
        y = compiled_gemv()(x[0], w)[None]
        return y if bias is None else y + bias
    return F.linear(x, w, bias)
