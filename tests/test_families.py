"""Every family against transformers: parity of logits, ragged batches and the KV
cache, both expert layouts, and clear errors for configs we cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling import Batch, CheckpointError, ConfigError, load_model
from tests.families import (FAMILY_CONFIGS, IDS, check_chunks_beside_another, check_ragged_batch, hf_logits,
                            write_hf_checkpoint)

FAMILIES = list(FAMILY_CONFIGS)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, transformers model), written once per module."""
    root = tmp_path_factory.mktemp("families")
    return {name: (root / name, write_hf_checkpoint(root / name, name, seed=i)) for i, name in enumerate(FAMILIES)}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(checkpoints, name):
    folder, hf = checkpoints[name]
    m = load_model(folder, dtype=torch.float32)
    assert m.config.model_type == hf.config.model_type
    got, want = m.logits(IDS), hf_logits(hf, IDS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_the_declarations_are_read(checkpoints):
    q = load_model(checkpoints["qwen3_moe"][0]).config
    assert q.experts_per_layer == [8, 0, 8] and q.qk_norm == "head" and q.o_bias and q.dense_intermediate_size == 40
    s = load_model(checkpoints["qwen3_moe-step"][0]).config
    assert s.experts_per_layer == [0, 8, 0, 8]
    g = load_model(checkpoints["glm4_moe"][0])
    c = g.config
    assert c.experts_per_layer == [0, 8, 8] and c.routing.scoring == "sigmoid" and c.routing.n_group == 2
    assert c.routing.scaling == 2.5 and c.rope.partial_rotary_factor == 0.5 and c.shared_mlp_size == 16
    assert not c.o_bias and c.attention_bias
    assert g.expert_ids(1) == list(range(8))  # the shared MLP is no routed expert
    assert g.weights.layers[1].shared_mlp is not None
    x = load_model(checkpoints["mixtral"][0]).config
    assert x.routing.renormalise and x.rope.theta == 1e6


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "glm4_moe"])
def test_fused_expert_layout_reads_the_same(checkpoints, tmp_path, name):
    """transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up, [E, H, I] down; Mixtral under
    `mlp.` instead of `block_sparse_moe.`); a checkpoint saved from that state dict loads the same."""
    folder, hf = checkpoints[name]
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if not k.endswith("inv_freq")}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.testing.assert_close(load_model(tmp_path).logits(IDS), load_model(folder).logits(IDS), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "glm4_moe", "olmoe", "gpt_oss", "deepseek_v3",
                                  "deepseek_v3-yarn", "glm4_moe_lite", "flex_olmo"])
def test_ragged_batch_and_kv_cache_decode_equal_recompute(checkpoints, name):
    m = load_model(checkpoints[name][0])
    check_ragged_batch(m, m.new_cache(4, 32), atol=1e-5)


# -- configs and checkpoints we cannot run: clear errors --------------------------


def _cfg(checkpoints, name) -> dict:
    return json.loads((checkpoints[name][0] / "config.json").read_text())


def _with_config(tmp_path, checkpoints, name, **change):
    folder = checkpoints[name][0]
    out = tmp_path / f"changed-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**_cfg(checkpoints, name), **change}))
    (out / "model.safetensors").symlink_to(folder / "model.safetensors")
    return out


def test_unknown_model_type_names_the_supported_ones(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="unknown model_type 'made_up_moe'") as e:
        load_model(_with_config(tmp_path, checkpoints, "glm4_moe", model_type="made_up_moe"))
    for mt in ("emo", "olmoe", "qwen3_moe", "mixtral", "glm4_moe", "deepseek_v3", "glm4_moe_lite"):
        assert mt in str(e.value)


@pytest.mark.parametrize("key,value", [("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
                                       ("rope_scaling", {"type": "longrope"})])
def test_unsupported_rope_type_is_named(checkpoints, tmp_path, key, value):
    rtype = value.get("rope_type") or value.get("type")
    with pytest.raises(ConfigError, match=f"RoPE type '{rtype}'.*supported: default"):
        load_model(_with_config(tmp_path, checkpoints, "qwen3_moe", **{key: value}))


def test_group_count_that_does_not_divide_the_experts(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="n_group 3 does not divide the 8 routed experts"):
        load_model(_with_config(tmp_path, checkpoints, "glm4_moe", n_group=3))
    with pytest.raises(ConfigError, match="topk_group"):
        load_model(_with_config(tmp_path, checkpoints, "glm4_moe", topk_group=4))


def test_missing_correction_bias_is_named(checkpoints, tmp_path):
    folder = checkpoints["glm4_moe"][0]
    t = load_file(str(folder / "model.safetensors"))
    del t["model.layers.2.mlp.gate.e_score_correction_bias"]
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.gate.e_score_correction_bias.*missing"):
        load_model(tmp_path)


def test_sliding_window_is_refused(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="sliding_window 16"):
        load_model(_with_config(tmp_path, checkpoints, "mixtral", sliding_window=16))


# -- multi-head latent attention (deepseek_v3, glm4_moe_lite) -----------------------


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3-yarn", "glm4_moe_lite"])
def test_latent_cache_in_chunks_of_one_to_three_beside_another_sequence(checkpoints, name):
    """Prompt chunks of 1-3 tokens through the latent cache, in slot 2 while another sequence
    decodes in slot 0: every step equals recomputing the prefix."""
    m = load_model(checkpoints[name][0])
    cache = m.new_cache(3, 32)
    other = [21, 22]
    m.forward(Batch(torch.tensor(other), [0], [0], [2], []), cache)
    check_chunks_beside_another(m, cache, IDS + [9, 8, 7], 2, 0, [1, 3, 2, 1, 3, 1, 2, 1, 1], other, 0)


def test_latent_cache_holds_the_latent_not_the_keys(checkpoints):
    """Per position and layer the MLA state keeps kv_lora_rank + qk_rope_head_dim values (not
    heads x (qk + v)), and deploy's sizing (nbytes_for) is what the cache allocates."""
    from modeling import KVCache

    m = load_model(checkpoints["deepseek_v3"][0])
    cache = m.new_cache(2, 16)
    mla = m.config.extra["mla"]
    assert [tuple(t.shape) for t in cache[0].tensors()] == [(2, 1, 16, mla["kv_lora_rank"]),
                                                           (2, 1, 16, mla["qk_rope_head_dim"])]
    assert cache.nbytes() == KVCache.nbytes_for(m.config, 2, 16, 4) == 3 * 2 * 16 * (12 + 4) * 4


def test_kv_rank_that_disagrees_with_the_tensors_is_named(checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.*shape.*kv_lora_rank 10"):
        load_model(_with_config(tmp_path, checkpoints, "deepseek_v3", kv_lora_rank=10))


def test_unknown_layer_type_is_named(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="'mamba'"):
        load_model(_with_config(tmp_path, checkpoints, "gpt_oss", layer_types=["mamba", "full_attention",
                                                                                "sliding_attention"]))


def test_partial_rope_with_mla_is_refused(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5"):
        load_model(_with_config(tmp_path, checkpoints, "deepseek_v3", partial_rotary_factor=0.5))


def test_kimi_k2_is_deepseek_v3_under_its_own_model_type(checkpoints, tmp_path):
    """Kimi-K2's config.json says model_type kimi_k2 over DeepSeek-V3's layout and keys."""
    m = load_model(_with_config(tmp_path, checkpoints, "deepseek_v3", model_type="kimi_k2"))
    assert m.config.layer_types == ["mla"] * 3 and m.config.routing.n_group == 2
    torch.testing.assert_close(m.logits(IDS), load_model(checkpoints["deepseek_v3"][0]).logits(IDS), atol=0, rtol=0)
