"""Qwen3-Next and Qwen3.5-MoE (hybrid Gated DeltaNet + gated full attention, a gated shared
expert beside routed experts) against transformers, on checkpoints transformers wrote:
logits, decode through the per-slot recurrent state and KV cache on ragged batches, the
pool-restricted forward against a stock-loaded uniform profile, and the parts left out
(vision tower, MTP head)."""

from __future__ import annotations

import json

import pytest
import torch

from modeling import Batch, ConfigError, ProfileManifest, load_model
from subsetting.cli import main
from tests.checkpoints import write_domain_corpus, write_tokenizer
from tests.families import IDS, check_ragged_batch, hf_logits, stock
from tests.families_hybrid import HYBRID, write_hybrid_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

KEPT = {i: [0, 2, 5, 7] for i in range(4)}  # 4 of 8 routed experts in every layer (the shared expert stays)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    out = {}
    for i, name in enumerate(HYBRID):
        out[name] = (root / name, write_hybrid_checkpoint(root / name, name, seed=20 + i))
        write_tokenizer(root / name, 300)
    out["corpus"] = write_domain_corpus(root / "corpus.jsonl")
    return out


@pytest.mark.parametrize("name", HYBRID)
def test_logits_match_transformers(checkpoints, name):
    folder, hf = checkpoints[name]
    m = load_model(folder, dtype=torch.float32)
    assert m.config.model_type == name
    assert m.config.layer_types == ["linear_attention"] * 3 + ["gated_attention"]
    torch.testing.assert_close(m.logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HYBRID)
def test_ragged_batch_and_state_decode_equal_recompute(checkpoints, name):
    """Three sequences in one packed prefill, then prompt pieces of 1 to 3 tokens and decode
    steps side by side, in slots a previous sequence left dirty: every row equals recompute."""
    m = load_model(checkpoints[name][0])
    cache = m.new_cache(4, 32)
    m.forward(Batch(torch.tensor(IDS[:7]), [2], [0], [7], []), cache)  # a previous owner of slot 2
    check_ragged_batch(m, cache, atol=1e-4)

    # a prompt fed in pieces of 1, 2, 3 tokens beside another sequence's decode steps
    fresh = m.new_cache(2, 32)
    prompt, other = IDS[1:11], IDS[:4]
    m.forward(Batch(torch.tensor(other), [1], [0], [4], []), fresh)
    got, done, extra = [], 0, []
    for n in (1, 2, 3, 1, 3):
        tok = 40 + len(extra)
        b = Batch(torch.tensor(prompt[done:done + n] + [tok]), [0, 1], [done, 4 + len(extra)], [n, 1], [])
        rows = m.forward(b, fresh, "all").logits
        got.append(rows[:n])
        done += n
        extra.append(tok)
        torch.testing.assert_close(rows[n], m.logits(other + extra)[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(got), m.logits(prompt[:done]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HYBRID)
def test_uniform_profile_loads_in_stock_transformers_and_equals_the_pool(checkpoints, tmp_path, name):
    base = checkpoints[name][0]
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT.items()}))
    prof = tmp_path / "profile"
    assert main([str(a) for a in ("build", base, "--out", prof, "--experts-file", ef, "-q")]) == 0
    cfg = json.loads((prof / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["num_experts"] == 4 and "num_experts_per_layer" not in text
    pooled = load_model(base).logits(IDS, pool=KEPT)
    torch.testing.assert_close(hf_logits(stock(prof), IDS), pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(load_model(prof).logits(IDS), pooled, atol=1e-5, rtol=0)
    assert not torch.allclose(pooled, load_model(base).logits(IDS), atol=1e-3)  # the pool matters
    names = load_model(prof).files.names()
    assert not [n for n in names if n.startswith(("mtp.", "model.visual."))]  # left out
    man = ProfileManifest.read(prof)
    assert man.kept_experts == KEPT
    assert "mtp." in man.left_out  # profile.json says what was left out, and why
    assert ("model.visual." in man.left_out) == (name == "qwen3_5_moe")


@pytest.mark.parametrize("name,method", [("qwen3_next", "output-aware")] + [
    ("qwen3_5_moe", m) for m in ("mean-prob", "layerwise", "output-aware", "random")])
def test_selection_from_a_corpus(checkpoints, tmp_path, name, method):
    """Every selection method over the hybrid layers (the builder's layer-at-a-time pass holds
    their recurrent state); the built profile equals the pool."""
    prof = tmp_path / "p"
    assert main([str(a) for a in ("build", checkpoints[name][0], "--out", prof, "--corpus", checkpoints["corpus"],
                                  "--keep", 4, "--method", method, "-q")]) == 0
    man = ProfileManifest.read(prof)
    torch.testing.assert_close(load_model(prof).logits(IDS), load_model(checkpoints[name][0]).logits(IDS, pool=man.pool()),
                               atol=1e-5, rtol=0)


def test_bad_linear_attention_config_is_named(checkpoints, tmp_path):
    folder = checkpoints["qwen3_next"][0]
    cfg = json.loads((folder / "config.json").read_text())
    out = tmp_path / "bad"
    out.mkdir()
    (out / "model.safetensors").symlink_to(folder / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**cfg, "layer_types": ["linear_attention", "mamba", "x", "y"]}))
    with pytest.raises(ConfigError, match="unknown layer type 'mamba'"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({**cfg, "linear_num_value_heads": 3}))
    with pytest.raises(ConfigError, match="linear_num_value_heads 3"):
        load_model(out)


def test_quantized_profile_serves_its_dequantized_weights(checkpoints, tmp_path):
    """`build --quantize int8` packs the attention, shared and routed expert matrices (the DeltaNet
    projections stay float, like the router); the profile's logits are those of its dequantized
    weights (1e-4) and near the float pool's."""
    from modeling.quant import PackedLinear

    base = checkpoints["qwen3_5_moe"][0]
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT.items()}))
    prof = tmp_path / "q"
    assert main([str(a) for a in ("build", base, "--out", prof, "--experts-file", ef, "--quantize", "int8", "-q")]) == 0
    names = load_model(prof).files.names()
    assert "model.language_model.layers.3.self_attn.q_proj.weight_packed" in names
    assert "model.language_model.layers.0.mlp.experts.1.down_proj.weight_packed" in names
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    got = load_model(prof).logits(IDS)
    deq = load_model(prof)
    for lw, module in zip(deq.weights.layers, deq.transformer.attention):
        for role in module.roles:
            if isinstance(getattr(lw.attn, role), PackedLinear):
                setattr(lw.attn, role, getattr(lw.attn, role).dequantize(torch.float32))
        for e in lw.experts.experts + [lw.shared_mlp]:
            e.gate, e.up, e.down = (x.dequantize(torch.float32) for x in (e.gate, e.up, e.down))
    torch.testing.assert_close(got, deq.logits(IDS), atol=1e-4, rtol=1e-4)
    ref = load_model(base).logits(IDS, pool=KEPT)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.05
