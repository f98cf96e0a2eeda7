"""The kernel layer: how the forward pass multiplies by its weights.

- `native`: the C++ extension built from `csrc/` when the project installs (dispatching at run time on
  the CPU's features: AVX-512 with VNNI/BF16, AVX2 + FMA, portable C++) and `EMO_CPU_ISA`.
- `dispatch`: `Kernels`, one kernel object per weight matrix (dense bf16 / float32, int8, int4, MXFP4)
  and the fused mixture-of-experts call; the pure-torch path wherever the native one does not apply.
- `compiled`: the TorchInductor GEMV of `--compile`, used on the torch path.
"""

from .compiled import compiled_gemv, linear_decode
from .dispatch import AMX_MIN_ROWS, Kernels, native_matrix
from .native import ENV, ISAS, IsaError, describe, extension, selected, supported

__all__ = ["AMX_MIN_ROWS", "ENV", "ISAS", "IsaError", "Kernels", "compiled_gemv", "describe",
           "extension", "linear_decode", "native_matrix", "selected", "supported"]
