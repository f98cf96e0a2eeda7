"""emo-subset export-gguf for the hybrid linear-attention families: Qwen3-Next -> llama.cpp's
`qwen3next`, Qwen3.5-MoE -> `qwen35moe`. Uniform profiles of transformers-written checkpoints,
read back with the gguf package's reader: metadata, tensor names and shapes, and the tensors
llama.cpp's converter rewrites (A_log, dt_bias, the conv kernel, zero-centred norms, Qwen3-Next's
fused projections, Qwen3.5's value-head order), each checked against the checkpoint's own bytes.

head_dim 32: llama.cpp's qwen35moe needs its MRoPE sections (32 pairs) to fit in a head.

Opt-in (EMO_LLAMA_CPP=/path/to/llama.cpp, a checkout with build/bin/libllama.so; the project's
setup has none, so it skips by default): llama.cpp itself runs each file, a prompt in one batch
then two decode steps (tests/llama_cpp_logits.c against libllama), and its logits must equal
ours. See docs/families.md."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling import load_model
from tests.checkpoints import write_tokenizer
from tests.families import IDS
from tests.families_hybrid import HYBRID, LINEAR, TEXT, write_hybrid_checkpoint
from tests.test_gguf import field, profile_and_gguf, run  # the export, as for the other families

gguf = pytest.importorskip("gguf")

KEPT = {i: [1, 2, 5, 7] for i in range(4)}  # 4 of 8 routed experts in every layer
ARCH = {"qwen3_next": "qwen3next", "qwen3_5_moe": "qwen35moe"}
H, D = TEXT["hidden_size"], 32
NK, NV, DK, DV, K = (LINEAR[k] for k in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                          "linear_value_head_dim", "linear_conv_kernel_dim"))
R = NV // NK
KEY, VALUE = NK * DK, NV * DV
CONV = 2 * KEY + VALUE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-hybrid")
    out = {}
    for i, name in enumerate(HYBRID):
        base = root / name
        write_hybrid_checkpoint(base, name, seed=50 + i, head_dim=D)
        prof, path = profile_and_gguf(root, name, base, KEPT)
        prefix = "model.language_model" if name == "qwen3_5_moe" else "model"
        out[name] = (base, prof, path, load_file(str(prof / "model.safetensors")), prefix)
    return out


def tiled(rows: np.ndarray, head: int, axis: int = 0) -> np.ndarray:
    """llama.cpp's value-head order for Qwen3.5: head j of key group g moves from g * R + j to j * NK + g."""
    order = [g * R + j for j in range(R) for g in range(NK)]
    idx = [h * head + d for h in order for d in range(head)]
    return np.take(rows, idx, axis=axis)


@pytest.mark.parametrize("name", HYBRID)
def test_metadata_read_back(exported, name):
    _, prof, path, _, _ = exported[name]
    arch, cfg = ARCH[name], load_model(prof).config
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.block_count") == 4
    assert field(r, f"{arch}.expert_count") == 4 and field(r, f"{arch}.expert_used_count") == 2
    assert field(r, f"{arch}.expert_feed_forward_length") == TEXT["moe_intermediate_size"]
    assert field(r, f"{arch}.expert_shared_feed_forward_length") == TEXT["shared_expert_intermediate_size"]
    assert field(r, f"{arch}.attention.key_length") == D and field(r, f"{arch}.attention.value_length") == D
    assert field(r, f"{arch}.rope.dimension_count") == D // 4  # partial RoPE, factor 0.25
    # the Gated DeltaNet sizes under llama.cpp's ssm.* keys
    assert field(r, f"{arch}.ssm.conv_kernel") == K
    assert field(r, f"{arch}.ssm.state_size") == DK
    assert field(r, f"{arch}.ssm.group_count") == NK
    assert field(r, f"{arch}.ssm.time_step_rank") == NV
    assert field(r, f"{arch}.ssm.inner_size") == VALUE
    assert field(r, f"{arch}.attention.recurrent_layers") == [True, True, True, False]
    assert field(r, f"{arch}.full_attention_interval") == 4
    if arch == "qwen35moe":
        assert field(r, "qwen35moe.rope.dimension_sections") == [11, 11, 10, 0]
    assert len(field(r, "tokenizer.ggml.tokens")) == cfg.vocab_size


@pytest.mark.parametrize("name", HYBRID)
def test_tensor_names_and_shapes(exported, name):
    _, _, path, _, _ = exported[name]
    t = {x.name: list(x.shape) for x in gguf.GGUFReader(path).tensors}  # GGUF dims innermost first
    for i in range(3):  # Gated DeltaNet layers
        assert t[f"blk.{i}.attn_qkv.weight"] == [H, CONV]
        assert t[f"blk.{i}.attn_gate.weight"] == [H, VALUE]
        assert t[f"blk.{i}.ssm_conv1d.weight"] == [K, CONV]
        assert t[f"blk.{i}.ssm_a"] == [NV] and t[f"blk.{i}.ssm_dt.bias"] == [NV]
        assert t[f"blk.{i}.ssm_norm.weight"] == [DV]
        assert t[f"blk.{i}.ssm_out.weight"] == [VALUE, H]
        if name == "qwen3_next":
            assert t[f"blk.{i}.ssm_ba.weight"] == [H, 2 * NV]
        else:
            assert t[f"blk.{i}.ssm_beta.weight"] == [H, NV] and t[f"blk.{i}.ssm_alpha.weight"] == [H, NV]
        assert f"blk.{i}.attn_q.weight" not in t
    heads, kv = TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    assert t["blk.3.attn_q.weight"] == [H, 2 * heads * D]  # query and output gate
    assert t["blk.3.attn_k.weight"] == [H, kv * D] and t["blk.3.attn_output.weight"] == [heads * D, H]
    assert t["blk.3.attn_q_norm.weight"] == [D] and "blk.3.ssm_a" not in t
    for i in range(4):
        assert t[f"blk.{i}.ffn_gate_exps.weight"] == [H, TEXT["moe_intermediate_size"], 4]
        assert t[f"blk.{i}.ffn_gate_inp.weight"] == [H, 4]
        assert t[f"blk.{i}.ffn_gate_inp_shexp.weight"] == [H, 1]
        assert t[f"blk.{i}.ffn_down_shexp.weight"] == [TEXT["shared_expert_intermediate_size"], H]
        assert t[f"blk.{i}.post_attention_norm.weight"] == [H]
    # per layer 9 MLP tensors (norm, router, 3 stacked, 3 shared, shared gate) beside the attention norm and
    # 8 DeltaNet tensors (9 with Qwen3.5's separate b and a) or 6 attention ones; embeddings, norm, output
    mlp, delta = 9, 8 if name == "qwen3_next" else 9
    assert len(t) == 3 + 3 * (1 + delta + mlp) + (1 + 6 + mlp)
    assert not [n for n in t if "nextn" in n or n.startswith(("v.", "mm."))]  # no MTP, no vision tower


@pytest.mark.parametrize("name", HYBRID)
def test_transformed_tensors_are_the_converters(exported, name):
    """Each rewritten tensor against the profile's stored bytes, transformed here as llama.cpp's
    convert_hf_to_gguf.py does it."""
    _, _, path, sd, p = exported[name]
    got = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(path).tensors}
    st = {k: v.float().numpy() for k, v in sd.items()}
    la = f"{p}.layers.1.linear_attn"
    reorder = (lambda a, head, axis=0: tiled(a, head, axis)) if name == "qwen3_5_moe" else (lambda a, h, axis=0: a)
    np.testing.assert_allclose(got["blk.1.ssm_a"], reorder(-np.exp(st[f"{la}.A_log"]), 1), rtol=1e-6)
    np.testing.assert_array_equal(got["blk.1.ssm_dt.bias"], reorder(st[f"{la}.dt_bias"], 1))
    conv = st[f"{la}.conv1d.weight"][:, 0, :]  # [C, 1, K] squeezed
    np.testing.assert_array_equal(got["blk.1.ssm_conv1d.weight"],
                                  np.concatenate([conv[:2 * KEY], reorder(conv[2 * KEY:], DV)]))
    np.testing.assert_array_equal(got["blk.1.ssm_norm.weight"], st[f"{la}.norm.weight"])  # gated norm: as is
    np.testing.assert_array_equal(got["blk.1.ssm_out.weight"], reorder(st[f"{la}.out_proj.weight"], DV, 1))
    # zero-centred norms are written as 1 + w (llama.cpp's RMSNorm multiplies by the weight)
    for gname, hf in (("blk.1.attn_norm.weight", f"{p}.layers.1.input_layernorm.weight"),
                      ("blk.2.post_attention_norm.weight", f"{p}.layers.2.post_attention_layernorm.weight"),
                      ("blk.3.attn_q_norm.weight", f"{p}.layers.3.self_attn.q_norm.weight"),
                      ("blk.3.attn_k_norm.weight", f"{p}.layers.3.self_attn.k_norm.weight"),
                      ("output_norm.weight", f"{p}.norm.weight")):
        np.testing.assert_allclose(got[gname], st[hf] + 1, rtol=0, atol=1e-7)
        assert np.abs(st[hf]).max() > 0.01  # the checkpoint's norms are not the init zeros
    np.testing.assert_array_equal(got["blk.3.attn_q.weight"], st[f"{p}.layers.3.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(got["blk.2.ffn_gate_inp_shexp.weight"],
                                  st[f"{p}.layers.2.mlp.shared_expert_gate.weight"])
    if name == "qwen3_next":
        # in_proj_qkvz rows per key head [q DK, k DK, v R*DV, z R*DV] -> attn_qkv (all q, all k, all v) + attn_gate
        qkvz = st[f"{la}.in_proj_qkvz.weight"]
        rows = {part: [] for part in "qkvz"}
        off = 0
        for _ in range(NK):
            for part, n in (("q", DK), ("k", DK), ("v", R * DV), ("z", R * DV)):
                rows[part].append(qkvz[off:off + n])
                off += n
        np.testing.assert_array_equal(got["blk.1.attn_qkv.weight"],
                                      np.concatenate(rows["q"] + rows["k"] + rows["v"]))
        np.testing.assert_array_equal(got["blk.1.attn_gate.weight"], np.concatenate(rows["z"]))
        np.testing.assert_array_equal(got["blk.1.ssm_ba.weight"], st[f"{la}.in_proj_ba.weight"])
    else:
        qkv = st[f"{la}.in_proj_qkv.weight"]
        np.testing.assert_array_equal(got["blk.1.attn_qkv.weight"],
                                      np.concatenate([qkv[:2 * KEY], tiled(qkv[2 * KEY:], DV)]))
        np.testing.assert_array_equal(got["blk.1.attn_gate.weight"], tiled(st[f"{la}.in_proj_z.weight"], DV))
        np.testing.assert_array_equal(got["blk.1.ssm_beta.weight"], tiled(st[f"{la}.in_proj_b.weight"], 1))
        np.testing.assert_array_equal(got["blk.1.ssm_alpha.weight"], tiled(st[f"{la}.in_proj_a.weight"], 1))
        assert R > 1 and not np.array_equal(tiled(st[f"{la}.in_proj_b.weight"], 1), st[f"{la}.in_proj_b.weight"])
    # routed experts: the profile's kept ones, in order (expert 2 of the profile is the base's expert 5)
    down = got["blk.2.ffn_down_exps.weight"]
    m = load_model(exported[name][1])
    np.testing.assert_array_equal(down[2], m.layer_experts(2).experts[2].down.float().numpy())


def test_base_checkpoint_with_vision_tower_and_mtp_exports_the_text_model(exported, tmp_path):
    base = exported["qwen3_5_moe"][0]  # 8 experts, model.visual.* and mtp.* in the file
    assert run("export-gguf", base, "--out", tmp_path / "b.gguf", "-q") == 0
    r = gguf.GGUFReader(tmp_path / "b.gguf")
    assert field(r, "qwen35moe.expert_count") == 8
    assert len(r.tensors) == len(gguf.GGUFReader(exported["qwen3_5_moe"][2]).tensors)


def test_what_llama_cpp_cannot_run_is_refused(tmp_path, capsys):
    cases = (("qwen3_next", {"linear_value_head_dim": 16}, "key head size 8 != value head size 16"),
             ("qwen3_next", {"norm_topk_prob": False}, "norm_topk_prob false"),
             ("qwen3_5_moe", {}, "MRoPE sections [11, 11, 10, 0] cover more than head_dim 16"))
    for k, (name, over, msg) in enumerate(cases):
        base = tmp_path / f"{name}-{k}"
        write_hybrid_checkpoint(base, name, seed=k, **over)  # head_dim 16
        write_tokenizer(base, 300)
        assert run("export-gguf", base, "--out", tmp_path / "x.gguf", "-q") == 2
        assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp-*"))


LLAMA_CPP = os.environ.get("EMO_LLAMA_CPP")


@pytest.fixture(scope="module")
def llama_logits(tmp_path_factory):
    """The compiled tests/llama_cpp_logits.c (EMO_LLAMA_CPP's headers and libllama)."""
    root, cc = Path(LLAMA_CPP), shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("llama") / "logits"
    lib = root / "build" / "bin"
    subprocess.run([cc, "-O1", "-o", str(exe), str(Path(__file__).with_name("llama_cpp_logits.c")),
                    f"-I{root / 'include'}", f"-I{root / 'ggml' / 'include'}", f"-L{lib}", "-lllama",
                    f"-Wl,-rpath,{lib}"], check=True)
    return exe


@pytest.mark.skipif(not LLAMA_CPP, reason="set EMO_LLAMA_CPP to a llama.cpp checkout with build/bin/libllama.so")
@pytest.mark.parametrize("name", HYBRID)
def test_llama_cpp_runs_the_file_to_our_logits(exported, llama_logits, name):
    _, prof, path, _, _ = exported[name]
    prompt = len(IDS) - 2  # then two decode steps through llama.cpp's recurrent state and KV cache
    out = subprocess.run([str(llama_logits), str(path), str(prompt), *map(str, IDS)], capture_output=True,
                         text=True, check=True).stdout
    got = torch.tensor([[float(x) for x in line.split()] for line in out.splitlines()])
    want = load_model(prof, dtype=torch.float32).logits(IDS)
    # ggml's CPU arithmetic (its exp / silu / softplus, summation order) differs at ~1e-3 on logits of ~2;
    # the already exported qwen3moe differs by as much. A wrong transform moves logits by far more.
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
