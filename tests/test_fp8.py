"""Block-scaled FP8 weights (`quant_method: fp8`, `weight_scale_inv`): read as stored, dequantized per
use bit for bit as transformers does, kept as stored in profiles, and clear errors for what is missing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling import CheckpointError, ConfigError, load_model
from modeling.quant.fp8 import Fp8Matrix
from subsetting.cli import main
from tests.families import IDS, hf_logits, quantize_fp8, stock, write_fp8_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp8") / "deepseek_v3"
    write_fp8_checkpoint(folder, "deepseek_v3")
    return folder


def test_dequantization_is_bit_equal_to_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(0)
    for shape, block in (((256, 384), (128, 128)), ((48, 40), (8, 8))):
        q, s = quantize_fp8(torch.randn(shape, generator=g), block)
        want = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(Fp8Matrix(q, s, block).dequantize(dtype), want.to(dtype) if dtype != torch.float32
                               else want)


def test_a_grid_the_block_does_not_divide_is_ceil_divided():
    """DeepSeek-V3's kv_a_proj_with_mqa is 576 rows in 128-row blocks: 5 scale rows, the last one partial."""
    q, s = quantize_fp8(torch.randn(56, 12), (8, 8))
    assert tuple(s.shape) == (7, 2)
    want = q.float() * s[torch.arange(56) // 8][:, torch.arange(12) // 8]
    assert torch.equal(Fp8Matrix(q, s, (8, 8)).dequantize(torch.float32), want)


def test_fp8_checkpoint_is_read_as_stored_and_matches_stock_transformers(fp8):
    m = load_model(fp8, dtype=torch.float32)
    attn = m.weights.layers[1].attn
    assert isinstance(attn.kv_a, Fp8Matrix) and attn.kv_a.weight.dtype == torch.float8_e4m3fn
    e = m.weights.layers[1].experts.experts[0]
    assert isinstance(e.down, Fp8Matrix) and e.gate_up is None
    # zero-copy: the FP8 bytes are the mapped file's
    lo, hi = m._mapped[0]
    assert lo <= attn.kv_a.weight.data_ptr() < hi and lo <= attn.kv_a.scale_inv.data_ptr() < hi
    st = stock(fp8)
    assert torch.equal(attn.kv_a.dequantize(torch.float32), st.model.layers[1].self_attn.kv_a_proj_with_mqa.weight)
    torch.testing.assert_close(m.logits(IDS), hf_logits(st, IDS), atol=1e-5, rtol=0)
    # bytes are counted as stored (1 byte per value + float32 scales)
    assert e.nbytes() == sum(t.numel() * t.element_size() for t in (e.gate.weight, e.gate.scale_inv, e.up.weight,
                                                                    e.up.scale_inv, e.down.weight, e.down.scale_inv))


def test_profile_keeps_the_fp8_bytes_and_scales(fp8, tmp_path):
    kept = {1: [0, 2, 3, 4, 5, 7], 2: [0, 1, 2, 4, 6, 7]}
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in kept.items()}))
    prof = tmp_path / "profile"
    assert main(["build", str(fp8), "--out", str(prof), "--experts-file", str(ef), "-q"]) == 0
    base, out = load_file(str(fp8 / "model.safetensors")), load_file(str(prof / "model.safetensors"))
    for new, j in enumerate(kept[2]):
        for part in ("gate_proj", "down_proj"):
            src, dst = f"model.layers.2.mlp.experts.{j}.{part}.weight", f"model.layers.2.mlp.experts.{new}.{part}.weight"
            assert out[dst].dtype == torch.float8_e4m3fn
            assert torch.equal(out[dst].view(torch.uint8), base[src].view(torch.uint8))
            assert torch.equal(out[dst + "_scale_inv"], base[src + "_scale_inv"])
    assert out["model.layers.1.self_attn.q_b_proj.weight_scale_inv"].dtype == torch.float32
    assert json.loads((prof / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    pooled = load_model(fp8).logits(IDS, pool=kept)
    torch.testing.assert_close(load_model(prof).logits(IDS), pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(hf_logits(stock(prof), IDS), pooled, atol=1e-4, rtol=0)


def _copy(fp8, tmp_path, drop=None, config=None):
    t = load_file(str(fp8 / "model.safetensors"))
    if drop:
        del t[drop]
    save_file(t, str(tmp_path / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return tmp_path


def test_missing_weight_scale_inv_is_named(fp8, tmp_path):
    name = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    with pytest.raises(CheckpointError, match=f"{name}.*missing.*FP8 weight"):
        load_model(_copy(fp8, tmp_path, drop=name))


def test_fp8_tensors_without_an_fp8_config_are_refused(fp8, tmp_path):
    def no_quant(cfg):
        cfg.pop("quantization_config")
        return cfg

    with pytest.raises(CheckpointError, match="float8_e4m3fn.*no quantization_config with quant_method 'fp8'"):
        load_model(_copy(fp8, tmp_path, config=no_quant))


def test_unsupported_fp8_settings_are_named(fp8, tmp_path):
    def static(cfg):
        cfg["quantization_config"]["activation_scheme"] = "static"
        return cfg

    with pytest.raises(ConfigError, match="activation_scheme 'static'"):
        load_model(_copy(fp8, tmp_path, config=static))
