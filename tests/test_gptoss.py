"""gpt-oss against transformers: attention sinks, sliding windows (and a KV cache that
holds only the window), YaRN, the router bias and clamped SwiGLU experts, MXFP4
experts read zero-copy and dequantized bit for bit as transformers does, profiles
that stock transformers loads (MXFP4 bytes kept as they are), and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modeling import Batch, CheckpointError, ConfigError, ProfileManifest, SamplingParams, load_model
from modeling.quant import mxfp4
from modeling.layers import RopeConfig, rope_tables
from modeling.quant.mxfp4 import FP4_VALUES, Mxfp4Matrix, dequantize, quantize
from modeling.quant.mxfp4 import gemv as mxfp4_gemv
from subsetting.cli import main
from subsetting.fingerprint import Fingerprints
from tests.checkpoints import write_domain_corpus, write_tokenizer
from tests.families import IDS, check_chunks_beside_another, hf_logits, stock, write_hf_checkpoint

transformers = pytest.importorskip("transformers")

LONG = IDS + [9, 8, 77, 123, 45, 6, 250, 11, 19, 3]  # 22 tokens: past the window of 4 several times
KEPT = {0: [1, 2, 5, 7], 1: [0, 3, 4, 6], 2: [2, 3, 5, 6]}
MX_MODULES = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


pytestmark = pytest.mark.usefixtures("one_thread")


def to_mxfp4(src: Path, dst: Path) -> None:
    """`src`'s experts as gpt-oss's hub checkpoints store them: `*_blocks` [E, out, in/32, 16] and
    `*_scales` [E, out, in/32] (nn.Linear layout, quantized per the OCP spec), biases as floats,
    and `quantization_config` {quant_method: mxfp4}."""
    out = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[k + "_blocks"], out[k + "_scales"] = quantize(v.transpose(1, 2))
        else:
            out[k] = v
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MX_MODULES}
    (dst / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(dst, 300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptoss")
    hf = write_hf_checkpoint(root / "float", "gpt_oss", seed=7)
    write_tokenizer(root / "float", 300)
    # MXFP4 needs in-features that are a multiple of 32: intermediate 32 here
    write_hf_checkpoint(root / "float32i", "gpt_oss", seed=8, intermediate_size=32)
    to_mxfp4(root / "float32i", root / "mxfp4")
    return {"float": root / "float", "hf": hf, "mxfp4": root / "mxfp4", "root": root}


# -- the forward pass -----------------------------------------------------------------


def test_logits_past_the_window_match_transformers_eager(ckpt):
    m = load_model(ckpt["float"])
    c = m.config
    assert c.sliding_windows == [4, None, 4] and c.attention_sinks and c.rope.type == "yarn"
    assert ckpt["hf"].config._attn_implementation == "eager"
    torch.testing.assert_close(m.logits(LONG), hf_logits(ckpt["hf"], LONG), atol=1e-4, rtol=0)


def test_sinks_and_clamp_matter(ckpt, tmp_path):
    """The test checkpoint exercises what it claims: zero sinks or no clamp change the logits."""
    m = load_model(ckpt["float"])
    base = m.logits(LONG)
    sinks = [lw.attn.sinks for lw in m.weights.layers]
    for lw in m.weights.layers:
        lw.attn.sinks = torch.full_like(lw.attn.sinks, -1e4)
    assert not torch.allclose(m.logits(LONG), base, atol=1e-3)
    for lw, s in zip(m.weights.layers, sinks):
        lw.attn.sinks = s
    m.config.extra["swiglu_limit"] = 1e9
    assert not torch.allclose(m.logits(LONG), base, atol=1e-3)


def test_windowed_cache_holds_only_the_window_and_decode_equals_recompute(ckpt):
    m = load_model(ckpt["float"])
    cache = m.new_cache(2, 40)
    assert [cache[i].k.shape[2] for i in range(3)] == [4, 40, 4]
    # prefill 6 (past the window), then chunks of 3 and single tokens, in slot 1 beside another sequence
    seq = LONG
    m.forward(Batch(torch.tensor(seq[:6]), [1], [0], [6], []), cache)
    other = [5, 17]
    m.forward(Batch(torch.tensor(other), [0], [0], [2], []), cache)
    check_chunks_beside_another(m, cache, seq, 1, 6, [3, 1, 1, 3, 1, 2, 1, 1, 1, 2], other, 0)


def test_cache_write_returns_the_window(ckpt):
    """KVCache.write: views while the ring has not wrapped; then exactly the keys a query sees."""
    cfg = load_model(ckpt["float"]).config
    from modeling import KVCache
    cache = KVCache(cfg, 1, 32, torch.float32, layers=[0, 1])
    kv = lambda a, b: torch.arange(a, b, dtype=torch.float32).view(1, -1, 1).expand(cfg.num_kv_heads, -1, cfg.head_dim)
    k, v, first = cache.write(0, 0, 0, kv(0, 3), kv(0, 3))
    assert first == 0 and k[0, :, 0].tolist() == [0, 1, 2]
    k, _, first = cache.write(0, 0, 3, kv(3, 9), kv(3, 9))  # 3 old keys the earliest new query still sees
    assert first == 0 and k[0, :, 0].tolist() == list(range(9))
    k, _, first = cache.write(0, 0, 9, kv(9, 10), kv(9, 10))  # a wrapped ring: the window of position 9
    assert first is None and sorted(k[0, :, 0].tolist()) == [6, 7, 8, 9]
    k, _, first = cache.write(0, 0, 10, kv(10, 12), kv(10, 12))
    assert first == 7 and k[0, :, 0].tolist() == [7, 8, 9, 10, 11]
    assert 2 not in cache.states and cache[1].k.shape[2] == 32


@pytest.mark.parametrize("params", [
    {"factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
    {"factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0, "original_max_position_embeddings": 2048},  # truncate
    {"factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"factor": 4.0, "original_max_position_embeddings": 512, "attention_factor": 1.3},
])
def test_yarn_tables_equal_transformers(params):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
    cfg = transformers.GptOssConfig(head_dim=64, num_attention_heads=4, hidden_size=256, max_position_embeddings=131072,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **params})
    ref = GptOssRotaryEmbedding(cfg)
    pos = torch.tensor([0, 1, 7, 100, 4095, 4096, 70000])
    cos_ref, sin_ref = ref(torch.zeros(1, dtype=torch.float32), pos[None])
    rest = {k: v for k, v in params.items()}
    cos, sin = rope_tables(RopeConfig("yarn", 150000.0, 1.0, rest), 64, pos)
    assert torch.equal(cos[:, :32], cos_ref[0]) and torch.equal(sin[:, :32], sin_ref[0])
    assert torch.equal(cos[:, 32:], cos[:, :32])  # rotate-half layout of the same table


def test_yarn_needs_the_original_context(ckpt, tmp_path):
    cfg = json.loads((ckpt["float"] / "config.json").read_text())
    cfg["rope_parameters"].pop("original_max_position_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(ckpt["float"] / "model.safetensors")
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        load_model(tmp_path)


# -- MXFP4 --------------------------------------------------------------------------------


def test_mxfp4_dequantization_equals_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 5, 16), dtype=torch.uint8, generator=g)  # every code, both nibbles
    scales = torch.arange(3 * 40 * 5).remainder(255).to(torch.uint8).view(3, 40, 5)  # every scale but NaN (255)
    for dt in (torch.bfloat16, torch.float32):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dt)  # [E, in, out] (transposed)
        ours = dequantize(blocks, scales, dt).transpose(1, 2)
        assert torch.equal(ours.view(torch.int16 if dt == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if dt == torch.bfloat16 else torch.int32))  # bits, -0.0 included


def test_mxfp4_codes_follow_the_ocp_spec():
    """E2M1: low nibble first; scale 2^(s-127); a block's scale is 2^(floor(log2 amax) - 2)."""
    blocks = torch.tensor([[[0x21, 0xF9] + [0] * 14]], dtype=torch.uint8)  # codes 1,2 | 9,15
    scales = torch.tensor([[128]], dtype=torch.uint8)
    d = dequantize(blocks, scales, torch.float32)[0]
    assert d[:4].tolist() == [1.0, 2.0, -1.0, -12.0] and FP4_VALUES[15] == -6.0
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([6.0, -3.0, 0.5, 1.25])
    b, s = quantize(w)
    assert s.item() == 127 and dequantize(b, s, torch.float32)[0, :4].tolist() == [6.0, -3.0, 0.5, 1.0]


def test_mxfp4_checkpoint_equals_transformers_and_is_read_zero_copy(ckpt):
    m = load_model(ckpt["mxfp4"])
    e = m.weights.layers[1].experts.experts[3]
    assert e.gate_up is None and e.mx_gate_up is not None and e.mx_gate_up.blocks.dtype == torch.uint8
    lo, hi = m._mapped[0]
    assert lo <= e.mx_gate_up.blocks.data_ptr() < hi  # a view of the mapped file, nothing expanded at load
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt["mxfp4"], dtype=torch.float32).eval()
    hf_gu = hf.model.layers[1].mlp.experts.gate_up_proj.data  # transformers dequantized it (CPU: no kernels)
    assert torch.equal(e.mx_gate_up.dequantize(torch.float32), hf_gu[3].t())
    torch.testing.assert_close(m.logits(LONG), hf_logits(hf, LONG), atol=1e-4, rtol=0)


def test_dequantized_expert_cache_is_bounded_and_changes_nothing(ckpt, torch_path):
    """The cache serves the pure-torch path (the native kernels read MXFP4 bytes directly)."""
    plain = load_model(ckpt["mxfp4"])
    one = 2 * 32 * 32 * 4  # float32 bytes of one gate_up [64, 32] matrix
    m = load_model(ckpt["mxfp4"], mxfp4_cache_bytes=3 * one)
    torch.testing.assert_close(m.logits(LONG), plain.logits(LONG), atol=0, rtol=0)
    c = m.transformer.mxfp4_cache
    assert 0 < c.bytes <= 3 * one and c.misses > 0
    before = c.hits
    m.logits(LONG[:3])
    assert c.hits >= before  # recently used experts come back expanded
    big = load_model(ckpt["mxfp4"], mxfp4_cache_bytes=1 << 30)
    big.logits(LONG)
    misses = big.transformer.mxfp4_cache.misses
    torch.testing.assert_close(big.logits(LONG), plain.logits(LONG), atol=0, rtol=0)
    assert big.transformer.mxfp4_cache.misses == misses  # everything was kept


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_fused_mxfp4_gemv_equals_dequantize_then_linear(dt):
    """mxfp4.gemv (the --compile decode path) multiplies the 4-bit bytes directly: every
    code and sign in both nibbles, typical scales, the two range ends the fused loop
    takes (2 and 252), and scales outside it, which go to the dequantizing path;
    equal to dequantize + F.linear up to the order of float32 accumulation."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (48, 4, 16), dtype=torch.uint8, generator=g)
    x = torch.randn(1, 4 * 32, generator=g)
    x[0, 32:64] *= 2.0 ** -120  # keeps the products of the 2^125 block finite
    x, bias = x.to(dt), torch.randn(48, generator=g).to(dt)
    typical = torch.randint(115, 131, (48, 4), dtype=torch.uint8, generator=g)
    ends, outside = typical.clone(), typical.clone()
    ends[0, 0], ends[1, 1] = 2, 252
    outside[2, 2], outside[3, 3] = 0, 1  # subnormal weights (above 252 a 6.0 code overflows to inf anyway)
    for scales, fused in ((typical, True), (ends, True), (outside, False)):
        m = Mxfp4Matrix(blocks, scales)
        want = F.linear(x.float(), m.dequantize(torch.float32), bias.float())
        calls = mxfp4.gemv_calls
        got = mxfp4_gemv(x, m, bias)
        assert (mxfp4.gemv_calls > calls) == fused
        assert got.dtype == dt and got.shape == (1, 48) and bool(torch.isfinite(got).all())
        if dt == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        else:  # both round the float32 result to bf16 once; an accumulation-order difference may flip the last bit
            torch.testing.assert_close(got.float(), want.to(dt).float(), rtol=2 ** -7, atol=0)


def test_compiled_decode_of_mxfp4_experts_equals_the_plain_model(ckpt, torch_path):
    """--compile decodes one row through the fused MXFP4 GEMV: same logits (float32
    accumulation order only) and the same greedy tokens as dequantizing per use (on the
    pure-torch path: the native kernels replace the Inductor loop where they are built)."""
    plain, fused = load_model(ckpt["mxfp4"]), load_model(ckpt["mxfp4"], compile=True)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert plain.generate(LONG[:12], params).token_ids == fused.generate(LONG[:12], params).token_ids
    cache = fused.new_cache(1, 40)
    fused.forward(Batch(torch.tensor(LONG[:6]), [0], [0], [6], []), cache)
    for pos in range(6, 12):  # one token per step: the fused path
        out = fused.forward(Batch(torch.tensor(LONG[pos:pos + 1]), [0], [pos], [1], []), cache).logits[0]
        torch.testing.assert_close(out, plain.logits(LONG[:pos + 1])[-1], atol=1e-4, rtol=0)
    calls = mxfp4.gemv_calls
    fused.forward(Batch(torch.tensor(LONG[12:13]), [0], [12], [1], []), cache)
    assert mxfp4.gemv_calls > calls  # it did take the fused loop


def _mx_variant(ckpt, tmp_path, change) -> Path:
    sd = load_file(ckpt["mxfp4"] / "model.safetensors")
    change(sd)
    out = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text((ckpt["mxfp4"] / "config.json").read_text())
    return out


def test_mxfp4_blocks_that_disagree_with_the_config_are_named(ckpt, tmp_path):
    name = "model.layers.2.mlp.experts.down_proj_blocks"
    bad = _mx_variant(ckpt, tmp_path, lambda sd: sd.__setitem__(name, sd[name][:, :, :, :8].contiguous()))
    with pytest.raises(CheckpointError, match=f"'{name}' has shape"):
        load_model(bad)


def test_missing_mxfp4_scales_are_named(ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.gate_up_proj_scales"
    bad = _mx_variant(ckpt, tmp_path, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=f"'{name}' is missing"):
        load_model(bad)


# -- profiles -------------------------------------------------------------------------------


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("kind", ["float", "mxfp4"])
def test_uniform_profile_loads_in_stock_transformers_and_equals_the_pool(ckpt, tmp_path, kind):
    base = ckpt[kind]
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT.items()}))
    prof = tmp_path / "profile"
    assert run("build", base, "--out", prof, "--experts-file", ef, "-q") == 0
    cfg = json.loads((prof / "config.json").read_text())
    assert cfg["num_local_experts"] == 4 and "num_experts_per_layer" not in cfg
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    pooled = load_model(base).logits(LONG, pool=KEPT)
    assert not torch.allclose(pooled, load_model(base).logits(LONG), atol=1e-3)
    torch.testing.assert_close(stock(prof)(torch.tensor([LONG])).logits[0], pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(load_model(prof).logits(LONG), pooled, atol=1e-5, rtol=0)
    man = ProfileManifest.read(prof)
    src, dst = load_model(base).files, load_model(prof).files
    for i, ids in KEPT.items():
        for n in src.names():
            if n.startswith(f"model.layers.{i}.mlp."):
                assert torch.equal(dst.get(n), src.get(n)[ids]), n  # every per-expert tensor, bytes as they were
    if kind == "mxfp4":
        assert man.quantization["experts"] == "mxfp4" and man.quantization["requantized"] is False
        assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in man.quantization["tensors"]
        assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    else:
        assert not man.quantization


@pytest.mark.parametrize("method", ["mean-prob", "layerwise", "output-aware", "random"])
def test_every_method_builds_a_gptoss_profile(ckpt, tmp_path, method):
    """Fingerprints, every selection method and the writer on the MXFP4 checkpoint; the profile
    equals the pool-restricted base and stock transformers."""
    corpus = write_domain_corpus(tmp_path / "corpus.jsonl")
    fp_path = tmp_path / "fp.npz"
    assert run("fingerprint", ckpt["mxfp4"], corpus, "--out", fp_path, "-q") == 0
    fp = Fingerprints.load(fp_path)
    assert fp.probs.shape[1:] == (3, 8)
    np.testing.assert_allclose(fp.probs.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(fp.topk_freq.sum(-1), 2, atol=1e-5)
    prof = tmp_path / "p"
    assert run("build", ckpt["mxfp4"], "--out", prof, "--corpus", corpus, "--keep", 4, "--method", method, "-q") == 0
    man = ProfileManifest.read(prof)
    assert all(len(v) == 4 for v in man.kept_experts.values())
    pooled = load_model(ckpt["mxfp4"]).logits(LONG, pool=man.pool())
    torch.testing.assert_close(load_model(prof).logits(LONG), pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(stock(prof)(torch.tensor([LONG])).logits[0], pooled, atol=1e-4, rtol=0)
