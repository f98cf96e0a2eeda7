"""emo-subset export-gguf: a profile of each family llama.cpp knows, read back with the gguf
package's own reader (architecture, metadata, tensor names, shapes and bytes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from modeling import load_model
from subsetting.cli import main
from tests.checkpoints import emo_config, write_checkpoint_dir, write_tokenizer
from tests.families import write_hf_checkpoint

gguf = pytest.importorskip("gguf")

# family -> (config overrides for llama.cpp's shape of it, kept experts per MoE layer, gguf arch)
CASES = {
    "olmoe": ({"num_key_value_heads": 4}, {0: [1, 2, 3, 4], 1: [0, 5, 6, 7], 2: [2, 3, 6, 7]}, "olmoe"),
    "qwen3_moe": ({"mlp_only_layers": [], "attention_bias": False}, {0: [1, 2, 5, 7], 1: [0, 1, 2, 3], 2: [0, 3, 4, 6]},
                  "qwen3moe"),
    "mixtral": ({}, {0: [0, 2, 5, 6], 1: [1, 3, 4, 7], 2: [2, 3, 5, 7]}, "llama"),
    "glm4_moe-air": ({}, {1: [0, 2, 4, 6], 2: [1, 3, 5, 7]}, "glm4moe"),
    # MLA -> llama.cpp's deepseek2 (one group: llama.cpp has no group-limited choice; no attention biases)
    "deepseek_v3": ({"n_group": 1, "topk_group": 1, "attention_bias": False}, {1: [0, 2, 4, 6], 2: [1, 3, 5, 7]},
                    "deepseek2"),
    "glm4_moe_lite": ({"attention_bias": False}, {1: [1, 2, 5, 6], 2: [0, 3, 4, 7]}, "deepseek2"),
}


def run(*args) -> int:
    return main([str(a) for a in args])


def field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def profile_and_gguf(root, name: str, base, kept: dict[int, list[int]]):
    """A checkpoint written at `base` (given a tokenizer here): its profile of the `kept` experts per layer
    and that profile's GGUF export, both through the CLI. Returns (profile folder, gguf path)."""
    write_tokenizer(base, 300)
    ef = root / f"{name}.json"
    ef.write_text(json.dumps({str(k): v for k, v in kept.items()}))
    prof = root / f"{name}-profile"
    assert run("build", base, "--out", prof, "--experts-file", ef, "-q") == 0
    path = root / f"{name}.gguf"
    assert run("export-gguf", prof, "--out", path, "-q") == 0
    return prof, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, (name, (over, kept, _)) in enumerate(CASES.items()):
        base = root / name
        write_hf_checkpoint(base, name, seed=30 + i, **over)
        out[name] = profile_and_gguf(root, name, base, kept)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_metadata_names_and_shapes_read_back(exported, name):
    prof, path = exported[name]
    _, kept, arch = CASES[name]
    cfg = load_model(prof).config
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.expert_count") == 4 and field(r, f"{arch}.expert_used_count") == cfg.top_k
    assert field(r, f"{arch}.block_count") == cfg.num_layers
    assert field(r, f"{arch}.embedding_length") == cfg.hidden_size
    if arch != "deepseek2":
        assert field(r, f"{arch}.attention.head_count_kv") == cfg.num_kv_heads
        assert field(r, f"{arch}.rope.dimension_count") == int(cfg.head_dim * cfg.rope.partial_rotary_factor)
    assert len(field(r, "tokenizer.ggml.tokens")) == cfg.vocab_size
    assert field(r, "tokenizer.ggml.model") == "gpt2" and len(field(r, "tokenizer.ggml.merges")) > 0
    tensors = {t.name: t for t in r.tensors}
    H, I = cfg.hidden_size, cfg.intermediate_size
    moe = sorted(kept)
    for i in moe:
        # GGUF lists dims innermost first: [H, I, E] for a [E, I, H] stack of gate weights
        assert list(tensors[f"blk.{i}.ffn_gate_exps.weight"].shape) == [H, I, 4]
        assert list(tensors[f"blk.{i}.ffn_up_exps.weight"].shape) == [H, I, 4]
        assert list(tensors[f"blk.{i}.ffn_down_exps.weight"].shape) == [I, H, 4]
        assert list(tensors[f"blk.{i}.ffn_gate_inp.weight"].shape) == [H, 4]
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_output.weight"} <= set(tensors)
    # the bytes are the profile's: expert 2 of the last MoE layer, down projection
    m = load_model(prof)
    want = m.layer_experts(moe[-1]).experts[2].down.float().numpy()
    got = np.asarray(tensors[f"blk.{moe[-1]}.ffn_down_exps.weight"].data)[2]
    np.testing.assert_array_equal(got, want)
    if arch == "glm4moe":
        assert field(r, "glm4moe.leading_dense_block_count") == 1
        assert field(r, "glm4moe.expert_shared_count") == 2
        assert field(r, "glm4moe.expert_gating_func") == int(gguf.ExpertGatingFuncType.SIGMOID)
        np.testing.assert_array_equal(np.asarray(tensors["blk.2.exp_probs_b.bias"].data),
                                      m.layer_experts(2).bias.numpy())
        assert "blk.1.ffn_gate_shexp.weight" in tensors and "blk.0.ffn_gate.weight" in tensors
    if arch == "deepseek2":
        mla = cfg.extra["mla"]
        nope, rope, v, r_kv, H_ = (mla["qk_nope_head_dim"], mla["qk_rope_head_dim"], mla["v_head_dim"],
                                   mla["kv_lora_rank"], cfg.num_heads)
        assert field(r, "deepseek2.attention.head_count_kv") == 1
        assert field(r, "deepseek2.attention.key_length") == r_kv + rope
        assert field(r, "deepseek2.attention.value_length") == r_kv
        assert field(r, "deepseek2.attention.key_length_mla") == nope + rope
        assert field(r, "deepseek2.attention.value_length_mla") == v
        assert field(r, "deepseek2.attention.q_lora_rank") == mla["q_lora_rank"]
        assert field(r, "deepseek2.attention.kv_lora_rank") == r_kv
        assert field(r, "deepseek2.rope.dimension_count") == rope
        assert field(r, "deepseek2.leading_dense_block_count") == 1
        assert field(r, "deepseek2.expert_gating_func") == int(gguf.ExpertGatingFuncType.SIGMOID)
        # kv_b_proj [heads * (nope + v), r] split as llama.cpp's converter does: k_b transposed, v_b as is
        kv_b = m.weights.layers[1].attn.kv_b.view(H_, nope + v, r_kv)
        np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_k_b.weight"].data),
                                      kv_b[:, :nope].transpose(1, 2).numpy())
        np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v_b.weight"].data), kv_b[:, nope:].numpy())
        assert "blk.1.attn_kv_b.weight" not in tensors
        assert {"blk.1.attn_q_a.weight", "blk.1.attn_q_a_norm.weight", "blk.1.attn_q_b.weight",
                "blk.1.attn_kv_a_mqa.weight", "blk.1.attn_kv_a_norm.weight", "blk.2.exp_probs_b.bias",
                "blk.1.ffn_gate_shexp.weight"} <= set(tensors)
    if arch == "qwen3moe":
        assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [cfg.head_dim]
    if arch == "llama":  # q rows permuted to llama.cpp's interleaved RoPE pairs, v untouched
        q = m.weights.layers[0].q
        D = cfg.head_dim
        perm = q.reshape(cfg.num_heads, 2, D // 2, H).swapaxes(1, 2).reshape(q.shape)
        np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), perm.numpy())
        np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data), m.weights.layers[0].v.numpy())


def test_what_llama_cpp_cannot_hold_is_refused(exported, tmp_path, capsys):
    emo = write_checkpoint_dir(tmp_path / "emo", emo_config(), seed=1)
    assert run("export-gguf", emo, "--out", tmp_path / "e.gguf", "-q") == 2
    err = capsys.readouterr().err
    assert "no architecture for model_type 'emo'" in err and "qwen3_moe" in err
    glm = tmp_path / "glm"
    write_hf_checkpoint(glm, "glm4_moe", seed=3)
    write_tokenizer(glm, 300)
    assert run("export-gguf", glm, "--out", tmp_path / "g.gguf", "-q") == 2
    assert "group-limited routing (n_group 2)" in capsys.readouterr().err
    qb = tmp_path / "qwen3-bias"  # llama.cpp's qwen3moe has no attention output bias
    write_hf_checkpoint(qb, "qwen3_moe", seed=3, mlp_only_layers=[], attention_bias=True)
    write_tokenizer(qb, 300)
    assert run("export-gguf", qb, "--out", tmp_path / "q.gguf", "-q") == 2
    assert "llama.cpp's qwen3moe has no attention output bias" in capsys.readouterr().err
    gqa = tmp_path / "olmoe-gqa"
    write_hf_checkpoint(gqa, "olmoe", seed=4)  # 2 kv heads for 4 query heads
    write_tokenizer(gqa, 300)
    assert run("export-gguf", gqa, "--out", tmp_path / "o.gguf", "-q") == 2
    assert "OLMoE with grouped-query attention (2 kv heads for 4 query heads)" in capsys.readouterr().err
    prof = tmp_path / "perlayer"
    base = exported["olmoe"][0]
    assert run("build", base, "--out", prof, "--keep", "4,4,3", "--method", "random", "-q") == 0
    assert run("export-gguf", prof, "--out", tmp_path / "p.gguf", "-q") == 2
    assert "different expert counts [3, 4]" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp-*"))
    path = exported["olmoe"][1]
    assert run("export-gguf", exported["olmoe"][0], "--out", path, "-q") == 2
    assert "already exists" in capsys.readouterr().err


def test_deepseek2_export_refusals_and_fp8(tmp_path, capsys):
    import torch

    from tests.families import write_fp8_checkpoint

    for name, over, msg in (("deepseek_v3", {"n_group": 1, "topk_group": 1, "rope_interleave": False,
                                             "attention_bias": False}, "rope_interleave false"),
                            ("deepseek_v3", {"n_group": 1, "topk_group": 1}, "MLA with attention biases")):
        base = tmp_path / f"ds-{len(msg)}"
        write_hf_checkpoint(base, name, seed=5, **over)
        write_tokenizer(base, 300)
        assert run("export-gguf", base, "--out", tmp_path / "x.gguf", "-q") == 2
        assert msg in capsys.readouterr().err
    # block-scaled FP8 weights are written dequantized to bfloat16 (llama.cpp has no such type)
    base = tmp_path / "fp8"
    write_fp8_checkpoint(base, "deepseek_v3", n_group=1, topk_group=1, attention_bias=False)
    write_tokenizer(base, 300)
    assert run("export-gguf", base, "--out", tmp_path / "f.gguf", "-q") == 0
    r = gguf.GGUFReader(tmp_path / "f.gguf")
    tensors = {t.name: t for t in r.tensors}
    e = load_model(base).layer_experts(2).experts[3]
    got = np.ascontiguousarray(np.asarray(tensors["blk.2.ffn_down_exps.weight"].data)[3]).view(np.int16)
    assert tensors["blk.2.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    np.testing.assert_array_equal(got, e.down.dequantize(torch.bfloat16).view(torch.int16).numpy())
