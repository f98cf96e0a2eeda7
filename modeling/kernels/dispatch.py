"""Every weight matrix as a kernel object, and the fused mixture-of-experts call.

`Kernels.linear(x, w, bias)` is the one way the forward pass multiplies by a weight. The first use of
a weight makes its kernel object (what the weight is, decided once: dense bf16 / float32, int8, int4
with or without zero points, MXFP4, or the lazily int8-quantized copy of `--quantize int8`), kept
while the weight lives; later calls go straight to it. On the native path the object reads float weights
as the mapped file stores them; a checkpoint's int8 / int4 matrix is copied once, on first use, with its
rows interleaved by 4 (a decoded token then reads one sequential stream per 4 rows) and its mapped pages
are given back, so resident memory holds it once at its quantized size (EMO_INTERLEAVE=0 reads the mapped
bytes instead). Nothing is expanded. A weight the native kernels do not take (another dtype, an
accelerator, an int4 group size they do not handle) keeps the ATen path it had before.

`Kernels.moe(layer_experts, h, route)` runs the chosen experts of every token of a step as one native
call with one parallel region per phase (gate/up, down) instead of one ATen call per expert matrix; it
returns None when a chosen expert has a matrix the native path does not take, and the caller then runs
its per-expert path.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers.blocks import apply_rope, rms_norm
from ..quant.mxfp4 import Mxfp4Matrix
from ..quant import Int8Cache, PackedLinear
from ..quant.lazy_int8 import drop_pages
from . import native as _native
from .compiled import linear_decode

# bf16 / float32 products of at least this many rows go to oneDNN (through F.linear) on the `amx` path,
# where its AMX tiles beat dot products; elsewhere our kernels take every row count.
AMX_MIN_ROWS = 16

# EMO_INTERLEAVE=0 keeps quantized checkpoint matrices in their stored layout (no interleaved copy; A/B runs).
INTERLEAVE_ENV = "EMO_INTERLEAVE"

# Forward passes of at most this many tokens run their (small) torch ops on one thread (Kernels.small_step).
SMALL_STEP_TOKENS = 16


class _TorchLinear:
    """The ATen path: F.linear, or a PackedLinear's own repacked kernels."""

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Tensor]):
        self.fn = fn

    def __call__(self, x: Tensor, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
        y = self.fn(x, bias)
        return y.float() if float_out else y


class _NativeLinear:
    def __init__(self, ext, mat, dense: Tensor | None, onednn_rows: int | None):
        self.ext, self.mat, self.dense, self.onednn_rows = ext, mat, dense, onednn_rows

    def native_for(self, rows: int) -> bool:
        """Whether a product of `rows` activation rows runs on our kernels (else oneDNN, on the amx path)."""
        return self.onednn_rows is None or rows < self.onednn_rows

    def __call__(self, x: Tensor, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
        if not self.native_for(x.shape[0]):
            y = F.linear(x, self.dense, bias)
            return y.float() if float_out else y
        return self.ext.linear(x, self.mat, bias, float_out)


class _IdentityCache:
    """Objects' kernel records keyed by identity, dropped when the object is collected (tensors and
    MXFP4 matrices are not usable as dict keys by value)."""

    def __init__(self):
        self._d: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, obj):
        hit = self._d.get(id(obj))
        if hit is not None and hit[0]() is obj:
            return hit[1]
        return None

    def put(self, obj, value) -> None:
        key = id(obj)
        self._d[key] = (weakref.ref(obj, lambda _, k=key, d=self._d: d.pop(k, None)), value)


def interleave_enabled() -> bool:
    """Whether quantized checkpoint matrices get their row-interleaved copy (INTERLEAVE_ENV=0: no)."""
    return os.environ.get(INTERLEAVE_ENV, "1").strip() != "0"


def _interleaved(mat, w: PackedLinear):
    """A checkpoint's int8 / int4 matrix with its rows interleaved by 4 (the extension's Matrix.interleave):
    one sequential stream per tile of 4 rows, the layout a decoded token reads fastest. The copy replaces
    the mapped bytes, whose pages are given back (a later touch reads the file again), so resident memory
    still holds each used matrix once, at its quantized size; `w.tensors()` then names the copy. One
    Matrix per PackedLinear (`w.native`), shared by every kernel object that reads it."""
    if interleave_enabled() and mat.interleave():
        drop_pages(w.packed, w.mapped)
    w.native = mat
    return mat


def native_matrix(ext, w, name: str = "weight", int8: Int8Cache | None = None):
    """The extension's Matrix for `w`, or None where the native kernels do not take it."""
    if isinstance(w, Mxfp4Matrix):
        if w.blocks.device.type != "cpu":
            return None
        return ext.mxfp4(w.blocks, w.scales, name)
    if isinstance(w, PackedLinear):
        if w.device.type != "cpu":
            return None
        if w.native is not None:
            return w.native
        s, (N, K) = w.scheme, w.shape
        data = w.packed.view(torch.uint8).view(N, -1)
        if s.bits == 8 and s.group_size is None and w.zero_point is None and K % 32 == 0:
            return _interleaved(ext.int8(data, K, w.scale, False, name), w)
        if s.bits == 4 and s.group_size is not None and K % 32 == 0:
            zp = w.zero_points()
            try:
                mat = ext.int4(data, K, w.scale, None if zp is None else zp.to(torch.int8), s.group_size, name)
            except ValueError:  # a group size this ISA's kernels do not take
                return None
            return _interleaved(mat, w)
        return None
    if not isinstance(w, Tensor) or w.device.type != "cpu" or w.dim() != 2 or w.stride(-1) != 1:
        return None
    if int8 is not None:
        if w.shape[1] % 32:  # the int8 kernels take whole activation blocks
            return None
        q = int8.get(w)
        return ext.int8(q.q, w.shape[1], q.scales, True, name)
    if w.dtype not in (torch.bfloat16, torch.float32):
        return None
    return ext.dense(w, name)


class Kernels:
    """The kernel objects of one model (see the module docstring)."""

    def __init__(self, device: torch.device, int8: Int8Cache | None = None, compile_decode: bool = False):
        self.device = torch.device(device)
        self.isa = _native.selected()  # raises IsaError for an EMO_CPU_ISA this machine cannot run
        self.ext = _native.native() if self.device.type == "cpu" else None
        self.int8 = int8
        self.compile_decode = compile_decode
        self._linear = _IdentityCache()
        self._dense = _IdentityCache()
        self._moe: dict[int, _LayerMoE] = {}

    @property
    def native(self) -> bool:
        return self.ext is not None

    @contextlib.contextmanager
    def small_step(self, tokens: int):
        """A forward pass of at most SMALL_STEP_TOKENS tokens (decode) runs its torch ops on one thread:
        the products, attention and norms are native and use the kernels' pool (sized to torch's thread
        count), and the torch ops left are too small to gain from threads; with threads, each parallel
        one wakes sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE), which costs more than the op."""
        n = torch.get_num_threads()
        if self.ext is None or tokens > SMALL_STEP_TOKENS or n == 1:
            yield
            return
        self.ext.set_threads(n)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
            self.ext.set_threads(0)

    # -- one matrix -----------------------------------------------------------------------------------
    def kernel(self, w) -> Callable[[Tensor, Tensor | None], Tensor]:
        k = self._linear.get(w)
        if k is None:
            k = self._make(w)
            self._linear.put(w, k)
        return k

    def linear(self, x: Tensor, w, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
        """x @ w.T + bias in x's dtype; `float_out`: those values as float32 (logits), which the native
        kernels write without the round trip through a second tensor."""
        return self.kernel(w)(x, bias, float_out)

    def linear_many(self, x: Tensor, ws, biases) -> list[Tensor]:
        """[linear(x, w, b) for w, b in zip(ws, biases)]: one native call (the activations prepared once, one
        parallel region) where every weight takes the native kernels, else a call each."""
        ks = [self.kernel(w) for w in ws]
        if all(isinstance(k, _NativeLinear) and k.native_for(x.shape[0]) for k in ks):
            return self.ext.linear_many(x, [k.mat for k in ks], list(biases))
        return [k(x, b) for k, b in zip(ks, biases)]

    def prepare(self, w: PackedLinear) -> bool:
        """Make a quantized checkpoint matrix's native kernel object now (what its first product would
        do); True when that made the interleaved copy the kernels read instead of the mapped bytes."""
        if self.ext is None or w.native is not None:
            return False
        mat = native_matrix(self.ext, w, w.name)
        return mat is not None and mat.interleaved

    def unquantized(self, x: Tensor, w: Tensor, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
        """x @ w.T + bias for a weight that stays in its own dtype whatever the model's quantization (a
        router): the native dense kernels where they take it, else F.linear."""
        k = self._dense.get(w)
        if k is None:
            mat = native_matrix(self.ext, w) if self.ext is not None else None  # None for other dtypes
            k = _NativeLinear(self.ext, mat, None, None) if mat is not None else _TorchLinear(
                lambda x, b, t=w: F.linear(x, t, b))
            self._dense.put(w, k)
        return k(x, bias, float_out)

    def _make(self, w):
        if self.ext is not None:
            mat = native_matrix(self.ext, w, int8=self.int8)
            if mat is not None:
                dense = w if isinstance(w, Tensor) and self.int8 is None else None
                amx = AMX_MIN_ROWS if self.isa == "amx" and dense is not None else None
                return _NativeLinear(self.ext, mat, dense, amx)
        if isinstance(w, PackedLinear):
            return _TorchLinear(w.linear)
        if isinstance(w, Mxfp4Matrix):
            return _TorchLinear(lambda x, b, m=w: F.linear(x, m.dequantize(x.dtype), b))
        if self.int8 is not None:
            return _TorchLinear(lambda x, b, t=w: self.int8.linear(x, t, b))
        if self.compile_decode:
            return _TorchLinear(lambda x, b, t=w: linear_decode(x, t, b))
        return _TorchLinear(lambda x, b, t=w: F.linear(x, t, b))

    # -- RMSNorm ---------------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """modeling.layers.rms_norm in one native call where it applies (CPU, x and weight of one dtype,
        bf16 or float32), else the torch ops."""
        if (self.ext is None or x.device.type != "cpu" or x.dtype != weight.dtype
                or x.dtype not in (torch.bfloat16, torch.float32) or x.requires_grad):
            return rms_norm(x, weight, eps)
        return self.ext.rms_norm(x, weight, eps)

    # -- RoPE ------------------------------------------------------------------------------------------------
    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """modeling.layers.apply_rope (rotate-half layout) in one native call where it applies (CPU, bf16 or
        float32, no autograd), else the torch ops: the same rounding points, so equal results."""
        if (self.ext is None or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32)
                or x.requires_grad or x.dim() < 2):
            return apply_rope(x, cos, sin)
        return self.ext.rope(x, cos, sin)

    # -- decode attention --------------------------------------------------------------------------------
    def attend_decode(self, q: Tensor, keys: Tensor, vals: Tensor, sinks: Tensor | None, scale: float) -> Tensor | None:
        """float32 `[heads, D]`: one query per head `q` `[heads, D]` against a cache slot's keys and values
        `[kv_heads, L, D]` (views, read in place), or None where the native kernel does not apply (another
        device or dtype, head_dim above its limit); the caller then runs its torch path."""
        if (self.ext is None or q.device.type != "cpu" or keys.dtype not in (torch.bfloat16, torch.float32)
                or keys.shape[-1] > self.ext.ATTN_DMAX or keys.stride(-1) != 1 or vals.stride(-1) != 1):
            return None
        return self.ext.attend_decode(q, keys, vals, sinks, scale)

    # -- a mixture of experts ---------------------------------------------------------------------------
    def moe(self, le, h: Tensor, indices: Tensor, weights: Tensor, valid: Tensor | None,
            activation: tuple[float, float] | None = None) -> Tensor | None:
        """float32 `[T, H]`: sum over each token's chosen slots of weight x expert(h), or None when the
        native path cannot run these experts. `valid` None: every index is a choice. `activation` (alpha,
        limit) selects gpt-oss's clamped SwiGLU over interleaved gate/up rows."""
        if self.ext is None or h.device.type != "cpu":
            return None
        lm = self._moe.get(id(le))
        if lm is None or lm.le is not le or lm.slots != len(le.experts):
            lm = self._moe[id(le)] = _LayerMoE(self, le, activation)
        slots = indices if valid is None else indices.masked_fill(~valid, -1)
        if not lm.ensure(set(slots.flatten().tolist())):  # a set of ints: cheaper than torch.unique
            return None
        return self.ext.moe(h, lm.set, slots, weights)


class _LayerMoE:
    """One MoE layer's native ExpertSet, slots filled in on first use and re-filled when the layer's
    slot holds another Expert object (a profile merged in or withdrawn)."""

    def __init__(self, k: Kernels, le, activation: tuple[float, float] | None):
        ext = k.ext
        self.k, self.le, self.slots = k, le, len(le.experts)
        if activation is None:
            self.set = ext.ExpertSet(self.slots, ext.ACT_SWIGLU)
        else:
            self.set = ext.ExpertSet(self.slots, ext.ACT_CLAMPED_SWIGLU, float(activation[0]), float(activation[1]))
        self.src: list[object | None] = [None] * self.slots  # the Expert each slot was last filled from
        self.ok: list[bool] = [False] * self.slots  # whether the native kernels took it

    def ensure(self, slots) -> bool:
        """Fill the chosen slots; False when one of them holds an expert the native path does not take."""
        experts = self.le.experts
        for s in slots:
            if s < 0:
                continue
            e = experts[s]
            if self.src[s] is not e:
                self.src[s], self.ok[s] = e, self._set(s, e)
            if not self.ok[s]:
                return False
        return True

    def _set(self, s: int, e) -> bool:
        ext, int8 = self.k.ext, self.k.int8
        name = f"expert slot {s}"

        def mat(w, part):
            return None if w is None else native_matrix(ext, w, f"{name} {part}", int8)

        if e.interleaved:
            gu = mat(e.mx_gate_up if e.mx_gate_up is not None else e.gate_up, "gate_up")
            dn = mat(e.mx_down if e.mx_down is not None else e.down, "down")
            if gu is None or dn is None:
                return False
            self.set.set(s, gu, None, dn, e.gate_up_bias, e.down_bias)
            return True
        if e.gate_up is not None and isinstance(e.gate_up, Tensor):
            inter = e.gate_up.shape[0] // 2
            gate, up = mat(e.gate_up[:inter], "gate"), mat(e.gate_up[inter:], "up")
        else:
            gate, up = mat(e.gate, "gate"), mat(e.up, "up")
        down = mat(e.down, "down")
        if gate is None or up is None or down is None:
            return False
        self.set.set(s, gate, up, down)
        return True


__all__ = ["AMX_MIN_ROWS", "Kernels", "native_matrix"]
