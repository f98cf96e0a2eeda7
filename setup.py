"""Builds the native CPU kernels (modeling/kernels/csrc) with torch's cpp_extension when the project
installs: `pip install --no-build-isolation -e .` after torch (the Makefile does this). Without a C++
compiler, or without torch at build time, the install goes on without the extension and the pure-torch
path runs (modeling.kernels.native prints a one-line warning)."""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("EMO_NO_NATIVE", "") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        src = "modeling/kernels/csrc"
        ext_modules = [CppExtension(
            "modeling.kernels._native",
            [f"{src}/ops.cpp", f"{src}/isa_portable.cpp", f"{src}/isa_avx2.cpp", f"{src}/isa_avx512.cpp"],
            # the ISA files choose their own instruction sets (#pragma GCC target); the rest is baseline
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno"],
        )]

        class OptionalBuild(BuildExtension):
            """A failed compile is a warning, not a failed install: the torch path still runs."""

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # compiler missing or failing
                    print(f"WARNING: native CPU kernels not built ({e}); the pure-torch path will run",
                          file=sys.stderr)

        cmdclass = {"build_ext": OptionalBuild.with_options(use_ninja=False)}
    except ImportError as e:
        print(f"WARNING: torch is not importable at build time ({e}); native CPU kernels not built. "
              "Install torch first, then `pip install --no-build-isolation .`", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
