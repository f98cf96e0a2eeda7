"""emo-subset on every family: profiles that stock transformers loads unchanged, whose
logits equal our pool-restricted forward of the base; every selection method; the
family's own tensor names and config keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modeling import ProfileManifest, load_model
from subsetting.cli import main
from subsetting.fingerprint import Fingerprints
from tests.checkpoints import write_domain_corpus, write_tokenizer
from tests.families import IDS, hf_logits, stock, write_hf_checkpoint

transformers = pytest.importorskip("transformers")

# A uniform kept set per family: 4 of 8 experts in every MoE layer (GLM, top-3 from one of 2 groups:
# 6, 3 from each group).
KEPT = {
    "qwen3_moe": {0: [1, 2, 5, 7], 2: [0, 3, 4, 6]},
    "mixtral": {0: [0, 2, 5, 6], 1: [1, 3, 4, 7], 2: [2, 3, 5, 7]},
    "glm4_moe": {1: [0, 1, 3, 4, 5, 6], 2: [1, 2, 3, 4, 6, 7]},
    "olmoe": {0: [1, 2, 3, 4], 1: [0, 5, 6, 7], 2: [2, 3, 6, 7]},
    "deepseek_v3": {1: [0, 2, 3, 4, 5, 7], 2: [0, 1, 2, 4, 6, 7]},  # top-3 from one of 2 groups, like GLM
    "glm4_moe_lite": {1: [1, 2, 5, 6], 2: [0, 3, 4, 7]},
    "flex_olmo": {0: [0, 1, 4, 6], 1: [2, 3, 5, 7], 2: [0, 3, 5, 6]},
}
COUNT_KEY = {"qwen3_moe": "num_local_experts",  # the key transformers 5 writes (hub configs: num_experts)
             "mixtral": "num_local_experts", "glm4_moe": "n_routed_experts",
             "olmoe": "num_experts", "deepseek_v3": "n_routed_experts", "glm4_moe_lite": "n_routed_experts",
             "flex_olmo": "num_experts"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-bases")
    out = {}
    for i, name in enumerate(KEPT):
        folder = root / name
        write_hf_checkpoint(folder, name, seed=10 + i)
        write_tokenizer(folder, 300)
        out[name] = folder
    out["corpus"] = write_domain_corpus(root / "corpus.jsonl")
    return out


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("name", list(KEPT))
def test_uniform_profile_loads_in_stock_transformers_and_equals_the_pool(bases, tmp_path, name):
    base = bases[name]
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT[name].items()}))
    prof = tmp_path / "profile"
    assert run("build", base, "--out", prof, "--experts-file", ef, "-q") == 0
    cfg = json.loads((prof / "config.json").read_text())
    assert "num_experts_per_layer" not in cfg and cfg[COUNT_KEY[name]] == len(KEPT[name][max(KEPT[name])])
    pooled = load_model(base).logits(IDS, pool=KEPT[name])
    torch.testing.assert_close(hf_logits(stock(prof), IDS), pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(load_model(prof).logits(IDS), pooled, atol=1e-5, rtol=0)
    # the pool really matters
    assert not torch.allclose(pooled, load_model(base).logits(IDS), atol=1e-3)
    man = ProfileManifest.read(prof)
    assert man.kept_experts == KEPT[name] and load_model(prof).expert_ids(max(KEPT[name])) == KEPT[name][max(KEPT[name])]


def test_glm_profile_slices_the_correction_bias_and_keeps_the_shared_mlp(bases, tmp_path):
    base = bases["glm4_moe"]
    ef = tmp_path / "e.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT["glm4_moe"].items()}))
    prof = tmp_path / "p"
    assert run("build", base, "--out", prof, "--experts-file", ef, "-q") == 0
    src, dst = load_model(base).files, load_model(prof).files
    b = "model.layers.2.mlp.gate.e_score_correction_bias"
    torch.testing.assert_close(dst.get(b), src.get(b)[KEPT["glm4_moe"][2]])
    for p in ("gate", "up", "down"):
        n = f"model.layers.1.mlp.shared_experts.{p}_proj.weight"
        assert torch.equal(dst.get(n), src.get(n))
    cfg = json.loads((prof / "config.json").read_text())
    assert cfg["n_group"] == 2 and cfg["n_shared_experts"] == 1


def test_group_limited_router_needs_the_same_count_from_every_group(bases, tmp_path, capsys):
    ef = tmp_path / "e.json"
    ef.write_text(json.dumps({"1": [0, 1, 2, 5, 6, 7], "2": [1, 2, 4, 5, 6, 7]}))  # 3 + 3, then 2 + 4
    assert run("build", bases["glm4_moe"], "--out", tmp_path / "p", "--experts-file", ef, "-q") == 2
    err = capsys.readouterr().err
    assert "layer 2 keeps [2, 4] experts from its 2 expert groups" in err and not (tmp_path / "p").exists()
    assert run("build", bases["glm4_moe"], "--out", tmp_path / "p", "--keep", 5, "--method", "random", "-q") == 2
    assert "keep a multiple of 2" in capsys.readouterr().err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("name", ["qwen3_moe", "glm4_moe", "mixtral"])
@pytest.mark.parametrize("method", ["mean-prob", "layerwise", "output-aware", "random"])
def test_every_method_on_every_family(bases, tmp_path, name, method):
    base = bases[name]
    prof = tmp_path / "p"
    keep = 6 if name == "glm4_moe" else 4
    assert run("build", base, "--out", prof, "--corpus", bases["corpus"], "--keep", keep, "--method", method, "-q") == 0
    man = ProfileManifest.read(prof)
    torch.testing.assert_close(load_model(prof).logits(IDS), load_model(base).logits(IDS, pool=man.pool()),
                               atol=1e-5, rtol=0)
    assert all(len(v) == keep for v in man.kept_experts.values())
    if name == "glm4_moe":  # three from each group of four
        assert all(sum(e < 4 for e in v) == 3 for v in man.kept_experts.values())
    torch.testing.assert_close(hf_logits(stock(prof), IDS), load_model(prof).logits(IDS), atol=1e-4, rtol=0)


def test_sigmoid_fingerprints_are_normalised_choice_scores(bases, tmp_path):
    fp_path = tmp_path / "fp.npz"
    assert run("fingerprint", bases["glm4_moe"], bases["corpus"], "--out", fp_path, "-q") == 0
    fp = Fingerprints.load(fp_path)
    assert fp.probs.shape == (6, 3, 8)
    np.testing.assert_allclose(fp.probs[:, 1:].sum(-1), 1, atol=1e-5)  # MoE layers 1, 2
    assert (fp.probs[:, 0] == 0).all()  # the dense first layer
    np.testing.assert_allclose(fp.topk_freq[:, 1:].sum(-1), 3, atol=1e-5)


def test_per_layer_counts_use_the_documented_extension(bases, tmp_path):
    base = bases["qwen3_moe"]
    prof = tmp_path / "p"
    assert run("build", base, "--out", prof, "--corpus", bases["corpus"], "--keep", "3,6", "-q") == 0
    cfg = json.loads((prof / "config.json").read_text())
    assert cfg["num_experts_per_layer"] == [3, 0, 6]
    man = ProfileManifest.read(prof)
    torch.testing.assert_close(load_model(prof).logits(IDS), load_model(base).logits(IDS, pool=man.pool()),
                               atol=1e-5, rtol=0)


def test_fused_mixtral_source_is_written_in_mixtral_names(bases, tmp_path):
    from safetensors.torch import save_file

    base = bases["mixtral"]
    hf = stock(base)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (fused / f).write_text((base / f).read_text())
    ef = tmp_path / "e.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT["mixtral"].items()}))
    prof = tmp_path / "p"
    assert run("build", fused, "--out", prof, "--experts-file", ef, "-q") == 0
    names = load_model(prof).files.names()
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not [n for n in names if ".mlp." in n]
    torch.testing.assert_close(hf_logits(stock(prof), IDS), load_model(base).logits(IDS, pool=KEPT["mixtral"]),
                               atol=1e-4, rtol=0)


def test_save_dtype_writes_a_bf16_profile_of_a_float32_base(bases, tmp_path):
    base = bases["glm4_moe"]
    ef = tmp_path / "e.json"
    ef.write_text(json.dumps({str(i): ids for i, ids in KEPT["glm4_moe"].items()}))
    prof = tmp_path / "p"
    assert run("build", base, "--out", prof, "--experts-file", ef, "--save-dtype", "bfloat16", "-q") == 0
    files = load_model(prof).files
    dtypes = {n: files.info(n).dtype for n in files.names()}
    assert dtypes.pop("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32  # choice stays exact
    assert dtypes.pop("model.layers.2.mlp.gate.e_score_correction_bias") == torch.float32
    assert set(dtypes.values()) == {torch.bfloat16}
    cfg = json.loads((prof / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    man = ProfileManifest.read(prof)
    assert man.bytes["experts"] == 2 * 6 * 3 * 16 * 32 * 2  # layers x kept x (gate, up, down) x I x H x 2 bytes
    # the same numbers as the base converted on load and restricted to the pool
    torch.testing.assert_close(load_model(prof).logits(IDS),
                               load_model(base, dtype="bfloat16").logits(IDS, pool=KEPT["glm4_moe"]), atol=1e-5, rtol=0)
    # and stock transformers loads it
    hf = transformers.AutoModelForCausalLM.from_pretrained(prof)
    assert hf.dtype == torch.bfloat16
