"""The native extension (`modeling/kernels/csrc`, built by setup.py when the project installs) and the
choice of instruction set.

`EMO_CPU_ISA` forces a path: `avx512` (AVX-512 F/BW/VL/DQ with VNNI and BF16), `avx2` (AVX2 + FMA),
`amx` (the avx512 kernels, with bf16 prefill GEMMs left to oneDNN, which uses AMX tiles), `portable`
(plain C++, any CPU) or `torch` (no native code: ATen, as before the extension existed). Unset, the best
path the CPU runs is used. A value the CPU cannot run is an error that lists the ones it can.

Without a built extension (no compiler at install time) everything runs on the pure-torch path, after a
one-line warning.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from types import ModuleType

ENV = "EMO_CPU_ISA"
ABI = 7  # what csrc/ops.cpp exports as ABI: the functions this Python code calls
ISAS = ("avx512", "amx", "avx2", "portable", "torch")


class IsaError(ValueError):
    """An EMO_CPU_ISA value this CPU (or this build) cannot run."""


@lru_cache(maxsize=1)
def extension() -> ModuleType | None:
    """The built extension module, or None (with one warning on stderr) when it is missing."""
    try:
        from . import _native  # type: ignore[attr-defined]
    except ImportError as e:
        if os.environ.get(ENV, "").strip() != "torch":
            print(f"emo-serve: native CPU kernels are not built ({e}); using the pure-torch path "
                  f"(reinstall with a C++ compiler: pip install --no-build-isolation -e .)", file=sys.stderr)
        return None
    if getattr(_native, "ABI", 0) != ABI:
        print(f"emo-serve: the native CPU kernels were built from older sources (ABI {getattr(_native, 'ABI', 0)}, "
              f"this code needs {ABI}); using the pure-torch path (rebuild: pip install --no-build-isolation -e .)",
              file=sys.stderr)
        return None
    return _native


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported() -> list[str]:
    """The paths this machine runs, best first."""
    ext = extension()
    out = list(ext.supported_isas()) if ext is not None else []
    if "avx512" in out and {"amx_tile", "amx_bf16"} <= _cpu_flags():
        out.insert(0, "amx")
    return out + ["torch"]


@lru_cache(maxsize=None)
def _select(requested: str) -> str:
    ok = supported()
    if requested:
        if requested not in ISAS:
            raise IsaError(f"{ENV}={requested!r} is not a kernel path; valid values: {', '.join(ISAS)} "
                           f"(this machine supports: {', '.join(ok)})")
        if requested not in ok:
            raise IsaError(f"{ENV}={requested!r} is not supported here; this machine supports: {', '.join(ok)}")
        choice = requested
    else:
        choice = ok[0]
    ext = extension()
    if ext is not None and choice != "torch":
        ext.set_isa("avx512" if choice == "amx" else choice)
    return choice


def selected() -> str:
    """The path in use: EMO_CPU_ISA's value (checked) or the best one supported."""
    return _select(os.environ.get(ENV, "").strip().lower())


def native() -> ModuleType | None:
    """The extension when the selected path is native, else None (the torch path)."""
    return None if selected() == "torch" else extension()


def describe() -> str:
    """One line for start-up summaries: the kernel path and how it was chosen."""
    s = selected()
    how = f"forced by {ENV}" if os.environ.get(ENV, "").strip() else "auto"
    if s == "torch":
        return f"kernels: torch (ATen, {how})"
    return f"kernels: native {s} ({how}; supported: {', '.join(supported())})"
