"""The native kernels (modeling/kernels/csrc) on every ISA path this host runs, against the pure-torch
reference: dense bf16 / float32, int8, int4 (with and without zero points) and MXFP4 against
dequantize-then-linear; the fused MoE call against the per-expert path on every family, under pools,
with greedy tokens unchanged; EMO_CPU_ISA; errors that name the tensor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling import Batch, SamplingParams, load_model
from modeling.kernels import extension, native_matrix
from modeling.quant.mxfp4 import FP4_VALUES, Mxfp4Matrix, dequantize as mx_dequantize
from modeling.quant import PackedLinear, WeightScheme
from tests.families import FAMILY_CONFIGS, IDS, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXT = extension()
pytestmark = pytest.mark.skipif(EXT is None, reason="the native extension is not built (no C++ compiler at install)")
ISAS = EXT.supported_isas() if EXT is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    """Each ISA path the host runs, forced for the test, then the default back."""
    before = EXT.current_isa()
    EXT.set_isa(request.param)
    yield request.param
    EXT.set_isa(before)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values [N, K] packed as compressed-tensors stores them (int32 words, low bits first)."""
    N, K = values.shape
    per = 32 // bits
    u = F.pad(values.to(torch.int64), (0, -K % per))  # the last word padded with zeros
    u = u.view(N, -1, per)
    words = torch.zeros(N, u.shape[1], dtype=torch.int64)
    for i in range(per):
        words |= u[..., i] << (bits * i)
    return words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else words.to(torch.int32)


def int_linear(bits: int, N: int, K: int, group: int | None, zero_points: bool, dtype=torch.bfloat16) -> PackedLinear:
    g = torch.Generator().manual_seed(bits * 100 + N + K)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (N, K), generator=g)
    G = 1 if group is None else K // group
    scale = (torch.rand(N, G, generator=g) * 0.02 + 0.001).to(dtype)
    zp = None
    if zero_points:
        z = torch.randint(-3, 3, (N, G), generator=g)
        zp = packed((z + (1 << (bits - 1))).t().contiguous(), bits).t()  # packed along the output dimension
    scheme = WeightScheme(bits, group, symmetric=not zero_points)
    return PackedLinear("w", scheme, (N, K), packed(q + (1 << (bits - 1)), bits), scale, zp, [])


SHAPES = [(1, 64, 256), (3, 68, 384), (9, 36, 128), (1, 5, 256)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_dense_kernels_equal_torch(isa, M, N, K):
    g = torch.Generator().manual_seed(M * N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05
    f32 = EXT.linear(x, EXT.dense(w, "w"))
    torch.testing.assert_close(f32, x @ w.T, rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    bf = EXT.linear(xb, EXT.dense(wb, "w"))
    assert bf.dtype == torch.bfloat16 and rel(bf, F.linear(xb, wb)) < 1e-2
    bias = torch.randn(N, generator=g)
    torch.testing.assert_close(EXT.linear(x, EXT.dense(w, "w"), bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bits,group,zp", [(8, None, False), (4, 128, False), (4, 128, True)])
def test_quantized_kernels_equal_dequantize_then_linear(isa, M, N, K, bits, group, zp):
    w = int_linear(bits, N, K, group, zp)
    if group is not None and K % group:
        pytest.skip("group does not divide K")
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(K)).bfloat16()
    mat = native_matrix(EXT, w, "w")
    assert mat is not None and mat.format == ("int8" if bits == 8 else "int4")
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    assert rel(EXT.linear(x, mat), ref) < 1e-2  # bf16 activations: int8 dot products, as llama.cpp's Q8_0
    torch.testing.assert_close(EXT.linear(x.float(), mat), ref, rtol=1e-4, atol=1e-4)  # float32: exact decode


@pytest.mark.parametrize("M,N,K", SHAPES + [(2, 8, 2880)])
def test_mxfp4_kernel_equals_dequantize_then_linear(isa, M, N, K):
    g = torch.Generator().manual_seed(N + K)
    blocks = torch.randint(0, 256, (N, K // 32, 16), dtype=torch.uint8, generator=g)  # every code, both nibbles
    scales = torch.randint(115, 135, (N, K // 32), dtype=torch.uint8, generator=g)
    m = Mxfp4Matrix(blocks, scales)
    x = torch.randn(M, K, generator=g).bfloat16()
    ref = F.linear(x.float(), mx_dequantize(blocks, scales, torch.float32))
    mat = native_matrix(EXT, m, "w")
    assert rel(EXT.linear(x, mat), ref) < 1e-2
    torch.testing.assert_close(EXT.linear(x.float(), mat), ref, rtol=1e-4, atol=1e-3)
    assert FP4_VALUES[15] == -6.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KVH,L,D,sinks", [(8, 2, 37, 64, False), (4, 4, 1, 32, False), (16, 2, 300, 128, True),
                                              (6, 1, 5, 72, True)])
def test_decode_attention_equals_torch(isa, dtype, H, KVH, L, D, sinks):
    """One query per head against strided cache views (a slot of a [slots, kv_heads, max_len, D] cache),
    grouped-query heads, gpt-oss sinks: the softmax-weighted sum in float32, as the torch path computes it."""
    from modeling.layers.attention import decode_attention as _decode_attention

    g = torch.Generator().manual_seed(H * L + D)
    cache_k = torch.randn(3, KVH, L + 9, D, generator=g).to(dtype)
    cache_v = torch.randn(3, KVH, L + 9, D, generator=g).to(dtype)
    keys, vals = cache_k[1][:, :L], cache_v[1][:, :L]  # views: head stride (L + 9) * D, position stride D
    q = torch.randn(H, D, generator=g).to(dtype) * 2
    s = torch.randn(H, generator=g) if sinks else None
    got = EXT.attend_decode(q, keys, vals, s, D ** -0.5)
    ref = _decode_attention(q.float(), keys.float(), vals.float(), s)
    assert got.dtype == torch.float32 and got.shape == (H, D)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_refuses_what_disagrees():
    q, k = torch.randn(8, 64), torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="head_dim of the keys"):
        EXT.attend_decode(q, torch.randn(2, 5, 32), torch.randn(2, 5, 32), None, 0.1)
    with pytest.raises(ValueError, match="do not group"):
        EXT.attend_decode(torch.randn(7, 64), k, k, None, 0.1)
    with pytest.raises(ValueError, match="both be bfloat16 or float32"):
        EXT.attend_decode(q, k, k.bfloat16(), None, 0.1)
    with pytest.raises(ValueError, match="sinks"):
        EXT.attend_decode(q, k, k, torch.zeros(3), 0.1)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_one_row_products_agree_streamed_and_tiled(isa, bits):
    """Decode (one activation row) streams each weight row alone by default; the 4-row tiles it replaced
    give the same sums (to float rounding): both orders of the same dot products."""
    N, K = 37, 512
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16() if bits == 16 else int_linear(bits, N, K, 128 if bits == 4 else None, False)
    mat = EXT.dense(w, "w") if bits == 16 else native_matrix(EXT, w, "w")
    x = torch.randn(1, K, generator=g).bfloat16()
    streamed = EXT.linear(x, mat).float()
    try:
        EXT.set_decode_streams(0)
        tiled = EXT.linear(x, mat).float()
        EXT.set_decode_streams(2)
        paired = EXT.linear(x, mat).float()
    finally:
        EXT.set_decode_streams(1)
    torch.testing.assert_close(streamed, tiled, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(paired, tiled, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("bits,N,K,zp", [(8, 37, 96, False), (8, 4, 2048, False), (4, 5, 384, False), (4, 38, 256, True)])
def test_interleaved_rows_equal_the_stored_layout(monkeypatch, isa, M, N, K, bits, zp):
    """A checkpoint's int8 / int4 matrix is copied with its rows interleaved by 4 (the default): the same
    dot products in the same order as the stored layout, so equal results, for row counts that are not a
    multiple of 4 and rows that end in a partial chunk; a copy made for one ISA's chunk width is not read
    by another ISA's kernels (they fall back to the stored bytes)."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(N)).bfloat16()
    monkeypatch.setenv("EMO_INTERLEAVE", "0")
    stored = native_matrix(EXT, int_linear(bits, N, K, 128 if bits == 4 else None, zp), "w")
    monkeypatch.setenv("EMO_INTERLEAVE", "1")
    w = int_linear(bits, N, K, 128 if bits == 4 else None, zp)  # the same values, another object
    inter = native_matrix(EXT, w, "w")
    assert native_matrix(EXT, w, "w") is inter  # one Matrix per PackedLinear
    assert not stored.interleaved and inter.interleaved == (isa != "portable")
    torch.testing.assert_close(EXT.linear(x, inter), EXT.linear(x, stored), rtol=0, atol=0)
    for other in ISAS:  # the copy was made for `isa`: every other path still gives its own exact answer
        EXT.set_isa(other)
        torch.testing.assert_close(EXT.linear(x, inter), EXT.linear(x, stored), rtol=0, atol=0)
    EXT.set_isa(isa)
    assert inter.interleave() == inter.interleaved  # made once


@pytest.mark.parametrize("M", [1, 5])
def test_linear_many_equals_a_call_each(isa, M):
    """q, k and v in one call (one activation preparation, one parallel region): equal to a call each, for
    int4, int8 and bf16 matrices with and without biases; a width that disagrees names the matrix."""
    K = 256
    g = torch.Generator().manual_seed(M)
    mats = [native_matrix(EXT, int_linear(4, 68, K, 128, False), "q"), native_matrix(EXT, int_linear(8, 36, K, None, False), "k"),
            EXT.dense((torch.randn(12, K, generator=g) * 0.05).bfloat16(), "v")]
    biases = [None, torch.randn(36, generator=g).bfloat16(), torch.randn(12, generator=g).bfloat16()]
    x = torch.randn(M, K, generator=g).bfloat16()
    for got, mat, b in zip(EXT.linear_many(x, mats, biases), mats, biases):
        torch.testing.assert_close(got, EXT.linear(x, mat, b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="wide: input of shape"):
        EXT.linear_many(x, [mats[0], EXT.dense(torch.randn(4, K + 32), "wide")], [None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,T,D,R", [(32, 1, 128, 128), (4, 7, 64, 32), (2, 3, 16, 16)])
def test_native_rope_equals_apply_rope(dtype, heads, T, D, R):
    """RoPE in one native call: bit-equal to modeling.layers.apply_rope (same rounding points), on the
    transposed [heads, T, D] views the attention modules pass, with partial rotary dims passed through."""
    from modeling.layers import apply_rope, rope_cos_sin

    g = torch.Generator().manual_seed(T * D)
    x = (torch.randn(T, heads, D, generator=g) * 3).to(dtype).transpose(0, 1)
    cos, sin = rope_cos_sin(R, torch.arange(5, 5 + T), 10000.0)
    torch.testing.assert_close(EXT.rope(x, cos, sin), apply_rope(x, cos, sin), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        EXT.rope(x, cos[:, :R - 1], sin[:, :R - 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 3, 128), (300, 64), (64, 2048)])
def test_native_rms_norm_equals_torch(dtype, shape):
    from modeling.layers import rms_norm

    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    got, ref = EXT.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:  # the float32 mean differs from torch's in its last bits: at most one bf16 rounding step apart
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
        assert (got == ref).float().mean() > 0.99
    with pytest.raises(ValueError, match="share a dtype"):
        EXT.rms_norm(x, w.float() if dtype == torch.bfloat16 else w.bfloat16(), 1e-6)


def test_small_steps_run_torch_ops_on_one_thread_and_restore_the_count():
    """A decode step's torch ops run on one thread while the kernels' pool keeps torch's count; the count
    is restored afterwards, also when the step raises."""
    from modeling.kernels import Kernels

    k = Kernels("cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with k.small_step(1):
            assert torch.get_num_threads() == 1 and EXT.pool_threads() == 2
        assert torch.get_num_threads() == 2
        with k.small_step(512):  # a prefill keeps torch's threads
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), k.small_step(1):
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_mismatched_shapes_and_missing_scales_name_the_tensor():
    w = EXT.dense(torch.randn(8, 64), "model.layers.0.mlp.experts.3.up_proj.weight")
    with pytest.raises(ValueError, match=r"up_proj\.weight.*input of shape"):
        EXT.linear(torch.randn(1, 65), w)
    with pytest.raises(ValueError, match=r"down_proj.*weight_scale has 3 values"):
        EXT.int8(torch.zeros(8, 64, dtype=torch.uint8), 64, torch.ones(3), False, "layers.1.down_proj")
    with pytest.raises(ValueError, match=r"gate_proj.*dtype"):
        EXT.dense(torch.zeros(8, 64, dtype=torch.int16), "layers.1.gate_proj")
    with pytest.raises(ValueError, match=r"q_proj.*blocks must be uint8"):
        EXT.mxfp4(torch.zeros(8, 2, 16, dtype=torch.int8), torch.zeros(8, 2, dtype=torch.uint8), "layers.0.q_proj")
    es = EXT.ExpertSet(2, EXT.ACT_SWIGLU)
    gate, down = EXT.dense(torch.randn(16, 32), "e.gate"), EXT.dense(torch.randn(32, 8), "e.down")
    with pytest.raises(ValueError, match=r"e\.down: shape 32 x 8 does not match"):
        es.set(0, gate, EXT.dense(torch.randn(16, 32), "e.up"), down)
    with pytest.raises(ValueError, match="slot 1 has no weights"):
        EXT.moe(torch.randn(1, 32), es, torch.tensor([[1, -1]]), torch.ones(1, 2))


def _run(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EMO_CPU_ISA"}
    if isa is not None:
        env["EMO_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_emo_cpu_isa_forces_a_path_and_refuses_what_the_cpu_cannot_run():
    code = "from modeling import kernels; print(kernels.selected(), kernels.extension().current_isa() if kernels.selected() != 'torch' else '-')"
    for isa in ISAS + ["torch"]:
        r = _run(code, isa)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == isa
    r = _run("from modeling import load_model; load_model('modeling/bundled/emo-demo')", "sse9")
    assert r.returncode != 0 and "valid values: avx512, amx, avx2, portable, torch" in r.stderr
    r = _run("from modeling import kernels; kernels.selected()", "amx")
    if "amx_tile" not in open("/proc/cpuinfo").read():
        assert r.returncode != 0 and "not supported here" in r.stderr and "this machine supports" in r.stderr


# -- the fused MoE against the per-expert path ------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-families")
    return {name: write_hf_checkpoint(root / name, name, seed=i) and root / name
            for i, name in enumerate(FAMILY_CONFIGS)}


def _models(folder, monkeypatch, dtype=torch.float32):
    monkeypatch.setenv("EMO_CPU_ISA", "torch")
    ref = load_model(folder, dtype=dtype)
    monkeypatch.delenv("EMO_CPU_ISA")
    fused = load_model(folder, dtype=dtype)
    assert fused.transformer.kernels.native and not ref.transformer.kernels.native
    return ref, fused


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_fused_moe_equals_per_expert_path(family_checkpoints, monkeypatch, isa, name):
    ref, fused = _models(family_checkpoints[name], monkeypatch)
    torch.testing.assert_close(fused.logits(IDS), ref.logits(IDS), atol=1e-4, rtol=0)
    # a pool: each MoE layer keeps 3 of its experts
    pool = {i: ids[:3] for i in range(ref.config.num_layers) if (ids := ref.expert_ids(i))}
    torch.testing.assert_close(fused.logits(IDS, pool=pool), ref.logits(IDS, pool=pool), atol=1e-4, rtol=0)
    # ragged batch: two sequences, prefill beside decode, through the cache
    for m in (ref, fused):
        cache = m.new_cache(2, 32)
        m.forward(Batch(torch.tensor(IDS[:5]), [0], [0], [5], []), cache)
        out = m.forward(Batch(torch.tensor(IDS[5:6] + IDS[:4]), [0, 1], [5, 0], [1, 4], []), cache)
        m._ragged = out.logits
    torch.testing.assert_close(fused._ragged, ref._ragged, atol=1e-4, rtol=0)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert fused.generate(IDS[:6], params).token_ids == ref.generate(IDS[:6], params).token_ids


def test_fused_moe_greedy_tokens_of_the_bf16_demo(monkeypatch):
    """bf16, with and without a pool: every token the native path decodes through its KV cache is the torch
    path's greedy choice for that prefix computed in full (the reference semantics), or within 2 bf16 ulps of
    it (a near-tie, which any reordering of bf16 sums may break either way: ATen's own one-row decode
    misses its prefill's choice at such points)."""
    demo = ROOT / "modeling" / "bundled" / "emo-demo"
    ref, fused = _models(demo, monkeypatch, dtype=None)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for prompt in ("def fib(n):", "12 + 30 =", "#include <stdio.h>"):
        for pool in (None, {i: list(range(0, 32, 2)) for i in range(4)}):
            ids = ref.tokenizer.encode(prompt)
            got = fused.generate(ids, params, pool=pool).token_ids
            exact = 0
            for i, tok in enumerate(got):
                logits = ref.logits(ids + got[:i], pool=pool)[-1]
                best = logits.max()
                assert best - logits[tok] <= 2 * 2 ** -7 * best.abs(), (prompt, i, tok, int(logits.argmax()))
                exact += int(logits.argmax()) == tok
            assert exact >= len(got) - 2, (prompt, exact)


def test_quantized_profile_through_the_native_path(tmp_path, monkeypatch):
    """An int4 and an int8 compressed-tensors model: logits within activation-quantization distance of the
    ATen path (bf16 activations), and the native path reads the packed bytes in place."""
    from tests.test_server import emo_subset

    demo = ROOT / "modeling" / "bundled" / "emo-demo"
    for q in ("int8", "int4"):
        out = tmp_path / q
        emo_subset("quantize", str(demo), "--quantize", q, "--out", str(out), "-q")
        ref, fused = _models(out, monkeypatch, dtype=None)
        ids = ref.tokenizer.encode("def add(a, b):\n    return a + b\n\nprint(add(1, 2))")
        a, b = fused.logits(ids), ref.logits(ids)
        assert rel(a, b) < 3e-2, q
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
        e = fused.weights.layers[0].experts.experts[0]
        assert e.gate._run is None and e.gate.native.interleaved  # the native kernels' copy, no ATen repacking
        assert e.gate.tensors()[0].data_ptr() != e.gate.packed.data_ptr()


def test_a_stale_build_is_refused_with_a_message(monkeypatch, capsys):
    """An extension built from older sources (editable install, sources pulled, not rebuilt) lacks what the
    Python side calls: it is refused with a message naming the rebuild, and the torch path runs."""
    from modeling.kernels import native

    monkeypatch.setattr(EXT, "ABI", native.ABI - 1)
    native.extension.cache_clear()
    try:
        assert native.extension() is None
        assert "older sources" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        native.extension.cache_clear()
        assert native.extension() is EXT


def test_pool_with_more_threads_than_cpus_gives_the_same_results():
    """Four pool threads on one CPU: workers are often not running when a call starts, so calls end without
    them (a closed call is never joined late) and late workers join later calls. Thousands of small calls
    of every kind must give exactly the single-threaded results."""
    code = r"""
import os, torch
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
from modeling.kernels import extension
ext = extension()
g = torch.Generator().manual_seed(0)
mats = [ext.dense((torch.randn(n, 256, generator=g) * 0.05).bfloat16(), "w") for n in (64, 96, 300)]
xs = [torch.randn(m, 256, generator=g).bfloat16() for m in (1, 3, 17)]
q, k, v = torch.randn(32, 128, generator=g), torch.randn(4, 64, 128, generator=g), torch.randn(4, 64, 128, generator=g)
ext.set_threads(1)
ref = [ext.linear(x, w) for x in xs for w in mats], ext.attend_decode(q, k, v, None, 0.125)
ext.set_threads(4)
for i in range(600):
    got = [ext.linear(x, w) for x in xs for w in mats]
    assert all(torch.equal(a, b) for a, b in zip(got, ref[0])), i
    assert torch.equal(ext.attend_decode(q, k, v, None, 0.125), ref[1]), i
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
