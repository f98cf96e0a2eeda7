"""Model core: parity with transformers (OLMoE) and the float64 reference (EMO),
pools vs pruned checkpoints, KV cache, ragged batches, zero-copy loading and
clear errors for broken checkpoints."""

from __future__ import annotations

import ctypes
import json
import threading
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modeling import (Batch, CheckpointError, ConfigError, PoolError, SamplingParams, StopChecker, load_model)
from modeling.sampling import filter_logits, sample_next
from tests.checkpoints import emo_config, lay_out_hub_cache, random_tensors, write_checkpoint_dir
from tests.reference import Reference

IDS = [5, 17, 42, 3, 99, 250, 7, 64, 128, 31, 2, 200]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# -- OLMoE against transformers --------------------------------------------------

@pytest.mark.parametrize("norm_topk,clip,kv_heads", [(False, None, 4), (True, 0.5, 2)])
def test_olmoe_matches_transformers(tmp_path, norm_topk, clip, kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OlmoeConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=norm_topk, clip_qkv=clip,
                                   max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.OlmoeForCausalLM(cfg).float().eval()
    with torch.no_grad():  # a random init with larger router weights spreads routing out
        for n, p in hf.named_parameters():
            p.normal_(0, 0.3 if "gate" in n else 0.1) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0].float()
    ours = load_model(tmp_path, dtype=torch.float32)
    got = ours.logits(IDS)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


# -- EMO against the float64 reference ------------------------------------------

EMO_VARIANTS = {
    "shared": emo_config(),
    "plain-norm": emo_config(num_shared_experts=0, norm_topk_prob=True),
    "always-active": emo_config(num_shared_experts=0, always_active_experts=[0, 5]),
    "per-layer-dense": emo_config(num_experts_per_layer=[8, 0, 5], num_shared_experts_per_layer=[1, 0, 1],
                                  dense_intermediate_size=24, dense_mlp_bias=True),
    "gqa-tied-k-over-E": emo_config(num_key_value_heads=2, num_experts_per_layer=[8, 2, 8],
                                    tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", list(EMO_VARIANTS))
def test_emo_routing_matches_float64_reference(tmp_path, name):
    cfg = EMO_VARIANTS[name]
    write_checkpoint_dir(tmp_path, cfg, seed=1, tokenizer=False)
    if cfg.get("tie_word_embeddings"):
        t = random_tensors(cfg, seed=1)
        del t["lm_head.weight"]
        save_file(t, str(tmp_path / "model.safetensors"))
    got = load_model(tmp_path).logits(IDS)
    want = Reference(tmp_path).logits(IDS)
    np.testing.assert_allclose(_np(got), want, atol=1e-4, rtol=0)


def test_fused_expert_layout_equals_per_expert(tmp_path):
    cfg = emo_config()
    per, fused = tmp_path / "per", tmp_path / "fused"
    write_checkpoint_dir(fused, cfg, seed=2, fused=True, tokenizer=False)
    # The same numbers, split into per-expert tensors.
    t = random_tensors(cfg, seed=2, fused=True)
    I = cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        gu, dn = t.pop(f"model.layers.{i}.mlp.experts.gate_up_proj"), t.pop(f"model.layers.{i}.mlp.experts.down_proj")
        for j in range(cfg["num_experts"]):
            t[f"model.layers.{i}.mlp.experts.{j}.gate_proj.weight"] = gu[j, :I].clone()
            t[f"model.layers.{i}.mlp.experts.{j}.up_proj.weight"] = gu[j, I:].clone()
            t[f"model.layers.{i}.mlp.experts.{j}.down_proj.weight"] = dn[j].clone()
    per.mkdir()
    save_file(t, str(per / "model.safetensors"))
    (per / "config.json").write_text(json.dumps(cfg))
    a, b = load_model(fused).logits(IDS), load_model(per).logits(IDS)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_np(a), Reference(fused).logits(IDS), atol=1e-4, rtol=0)


# -- pools ------------------------------------------------------------------------

POOL = {0: [1, 3, 4, 7], 1: [0, 2, 6, 7], 2: [2, 3, 5, 7]}  # expert 7 is the shared one


def _prune(src: Path, dst: Path, pool: dict[int, list[int]]) -> None:
    """A pruned checkpoint as AllenAI's script writes it: kept experts renumbered
    0..n-1 in original order, router rows sliced, num_experts_per_layer set."""
    cfg = json.loads((src / "config.json").read_text())
    out = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            parts = name.split(".")
            if ".mlp.experts." in name:
                i, j = int(parts[2]), int(parts[5])
                if j in pool[i]:
                    parts[5] = str(sorted(pool[i]).index(j))
                    out[".".join(parts)] = f.get_tensor(name)
            elif name.endswith("mlp.gate.weight"):
                out[name] = f.get_tensor(name)[sorted(pool[int(parts[2])])].contiguous()
            else:
                out[name] = f.get_tensor(name)
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg.pop("num_experts")
    cfg["num_experts_per_layer"] = [len(pool[i]) for i in range(cfg["num_hidden_layers"])]
    (dst / "config.json").write_text(json.dumps(cfg))


def test_pool_forward_equals_pruned_checkpoint(tmp_path):
    full, pruned = tmp_path / "full", tmp_path / "pruned"
    write_checkpoint_dir(full, emo_config(), seed=3, tokenizer=False)
    _prune(full, pruned, POOL)
    via_pool = load_model(full).logits(IDS, pool=POOL)
    via_pruned = load_model(pruned).logits(IDS)
    assert torch.allclose(via_pool, via_pruned, atol=1e-5, rtol=0), (via_pool - via_pruned).abs().max()
    np.testing.assert_allclose(_np(via_pool), Reference(full).logits(IDS, pool=POOL), atol=1e-4, rtol=0)
    # and the pool really changes the answer
    assert not torch.allclose(via_pool, load_model(full).logits(IDS), atol=1e-3)


def test_pool_smaller_than_k_and_unknown_expert(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(num_shared_experts=0, norm_topk_prob=True), seed=4, tokenizer=False)
    m = load_model(tmp_path)
    tiny = {0: [2], 1: [1, 3], 2: [0, 6]}  # fewer experts than top-k 3
    np.testing.assert_allclose(_np(m.logits(IDS, pool=tiny)), Reference(tmp_path).logits(IDS, pool=tiny), atol=1e-4)
    with pytest.raises(PoolError, match="layer 1: expert 99"):
        m.logits(IDS, pool={1: [99]})


def test_profile_experts_served_from_own_shards_and_shared_once(tmp_path):
    full = write_checkpoint_dir(tmp_path / "full", emo_config(), seed=5, tokenizer=False)
    m = load_model(full)
    profs = []
    for name, pool in (("a", {0: [0, 1, 7], 1: [0, 1, 7], 2: [0, 1, 7]}), ("b", {0: [1, 2, 7], 1: [1, 2, 7], 2: [1, 2, 7]})):
        d = tmp_path / name
        _prune(full, d, pool)
        (d / "profile.json").write_text(json.dumps({
            "format": "emo-serve-profile/1", "name": name, "base": m.identity, "num_experts_original": [8] * 3,
            "kept_experts": {str(i): ids for i, ids in pool.items()}}))
        profs.append(d)
    before = m.logits(IDS, pool={0: [1, 2, 7], 1: [1, 2, 7], 2: [1, 2, 7]})
    for d in profs:
        m.add_experts_from(d)
    le = m.layer_experts(0)
    assert le.sources[le.ids.index(0)] == str(profs[0])
    assert le.sources[le.ids.index(1)] == str(profs[0])  # kept by both: mapped once, from the first
    assert le.sources[le.ids.index(2)] == str(profs[1])
    assert le.sources[le.ids.index(5)] == str(full)  # in no profile: the base serves it
    after = m.logits(IDS, pool={0: [1, 2, 7], 1: [1, 2, 7], 2: [1, 2, 7]})
    assert torch.allclose(before, after, atol=1e-6)
    # A profile loaded on its own knows its original ids.
    p = load_model(profs[1])
    assert p.expert_ids(0) == [1, 2, 7]
    assert torch.allclose(p.logits(IDS), after, atol=1e-5)


def _corrupt_expert(folder: Path, layer: int, local: int) -> None:
    """Overwrite one expert's gate matrix in a profile's shard, in place (what a bad disk does)."""
    from modeling.io.safetensors_io import MappedSafetensors

    path = folder / "model.safetensors"
    info = MappedSafetensors(path).tensors[f"model.layers.{layer}.mlp.experts.{local}.gate_proj.weight"]
    data = bytearray(path.read_bytes())
    data[info.start:info.end] = torch.full((info.nbytes // 4,), 3.0).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_withdrawing_a_corrupt_profile_puts_sound_bytes_back(tmp_path):
    """A profile's experts take over the base's and are shared with later profiles: once it is found
    corrupt, `withdraw` re-points them to the base (or another profile), so `full` and the other
    profiles compute what they would have without it; experts only it held are reported."""
    full = write_checkpoint_dir(tmp_path / "full", emo_config(), seed=5, tokenizer=False)
    pools = {"a": {i: [0, 1, 7] for i in range(3)}, "b": {i: [1, 2, 7] for i in range(3)}}
    dirs = {}
    ident = load_model(full).identity
    for name, pool in pools.items():
        d = dirs[name] = tmp_path / name
        _prune(full, d, pool)
        (d / "profile.json").write_text(json.dumps({
            "format": "emo-serve-profile/1", "name": name, "base": ident, "num_experts_original": [8] * 3,
            "kept_experts": {str(i): ids for i, ids in pool.items()}}))
    _corrupt_expert(dirs["a"], 0, 1)  # original expert 1 of layer 0: kept by a and b, mapped from a
    clean = load_model(full)
    want_full, want_b = clean.logits(IDS), clean.logits(IDS, pool=pools["b"])

    m = load_model(full)
    for name in ("a", "b"):
        m.add_experts_from(dirs[name])
    assert not torch.allclose(m.logits(IDS), want_full, atol=1e-4)  # the corruption reaches full ...
    assert not torch.allclose(m.logits(IDS, pool=pools["b"]), want_b, atol=1e-4)  # ... and profile b
    assert m.withdraw(dirs["a"]) == {}
    le = m.layer_experts(0)
    assert le.sources[le.ids.index(0)] == str(full) and le.sources[le.ids.index(1)] == str(full)  # base first
    torch.testing.assert_close(m.logits(IDS), want_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.logits(IDS, pool=pools["b"]), want_b, atol=1e-5, rtol=0)

    # Without a base: experts only the withdrawn profile held have no sound source.
    only = load_model(dirs["b"])
    only.add_experts_from(dirs["a"])
    assert only.withdraw(dirs["a"]) == {i: [0] for i in range(3)}
    with pytest.raises(PoolError, match="cannot be withdrawn"):
        only.withdraw(dirs["b"])


def test_withdraw_waits_for_the_forward_pass_in_flight(tmp_path):
    """The server's verifier thread withdraws while the engine thread runs forward passes: the
    two are serialised on Model.lock, so a pass never sees half of the slots re-pointed."""
    full = write_checkpoint_dir(tmp_path / "full", emo_config(), seed=5, tokenizer=False)
    pool = {i: [0, 1, 7] for i in range(3)}
    _prune(full, tmp_path / "a", pool)
    (tmp_path / "a" / "profile.json").write_text(json.dumps({
        "format": "emo-serve-profile/1", "name": "a", "base": load_model(full).identity,
        "num_experts_original": [8] * 3, "kept_experts": {str(i): ids for i, ids in pool.items()}}))
    m = load_model(full)
    m.add_experts_from(tmp_path / "a")
    le = m.layer_experts(0)
    assert str(tmp_path / "a") in le.sources
    done: list = []
    for job in (lambda: done.append(m.withdraw(tmp_path / "a")), lambda: done.append(m.logits(IDS))):
        t = threading.Thread(target=job, daemon=True)
        with m.lock:  # what a forward pass in flight holds
            t.start()
            t.join(0.3)
            assert t.is_alive() and not done  # waiting for the pass to end
        t.join(30)
        assert not t.is_alive() and len(done) == 1
        done.clear()
    assert str(tmp_path / "a") not in le.sources


def test_profile_of_another_base_is_refused(tmp_path):
    a = write_checkpoint_dir(tmp_path / "a", emo_config(), seed=6, tokenizer=False)
    b = write_checkpoint_dir(tmp_path / "b", emo_config(rope_theta=500000.0), seed=6, tokenizer=False)
    with pytest.raises(PoolError, match="cut from base"):
        load_model(a).add_experts_from(b)


# -- cache and batching --------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention in the decode path
def test_kv_cache_decode_and_chunked_prefill_equal_recompute(tmp_path, kv_heads):
    write_checkpoint_dir(tmp_path, emo_config(num_key_value_heads=kv_heads), seed=7, tokenizer=False)
    m = load_model(tmp_path)
    rp = m.resolve_pool(POOL)
    full = m.logits(IDS, pool=POOL)
    cache = m.new_cache(2, 32)
    rows = [m.forward(Batch(torch.tensor(IDS[:4]), [1], [0], [4], [rp]), cache, "all").logits]
    rows.append(m.forward(Batch(torch.tensor(IDS[4:7]), [1], [4], [3], [rp]), cache, "all").logits)  # a chunk
    for pos in range(7, len(IDS)):
        rows.append(m.forward(Batch(torch.tensor([IDS[pos]]), [1], [pos], [1], [rp]), cache).logits)
    assert torch.allclose(torch.cat(rows), full, atol=1e-5, rtol=0)
    assert cache.lengths[1] == len(IDS)


def test_ragged_batch_equals_one_by_one(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=8, tokenizer=False)
    m = load_model(tmp_path)
    seqs = [IDS[:9], IDS[2:5], IDS[:12]]
    pools = [m.resolve_pool(POOL), None, m.resolve_pool({0: [0, 1, 2, 7]})]
    cache = m.new_cache(4, 32)
    slots = [3, 0, 2]
    out = m.forward(Batch(torch.tensor(sum(seqs, [])), slots, [0, 0, 0], [len(s) for s in seqs], pools), cache, "all").logits
    off = 0
    for s, p in zip(seqs, pools):
        alone = m.logits(s, pool=p)
        assert torch.allclose(out[off:off + len(s)], alone, atol=1e-5, rtol=0)
        off += len(s)
    # a mixed step: two decodes and a new prefill in one batch
    nxt = [1, 2]
    out2 = m.forward(Batch(torch.tensor(nxt + IDS[:3]), [3, 0, 1], [9, 3, 0], [1, 1, 3], [pools[0], None, None]), cache, "last").logits
    assert torch.allclose(out2[0], m.logits(seqs[0] + [1], pool=pools[0])[-1], atol=1e-5)
    assert torch.allclose(out2[1], m.logits(seqs[1] + [2])[-1], atol=1e-5)
    assert torch.allclose(out2[2], m.logits(IDS[:3])[-1], atol=1e-5)


def test_bf16_runs_close_to_float32(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=9, dtype=torch.bfloat16, tokenizer=False)
    a = load_model(tmp_path)
    assert a.dtype == torch.bfloat16
    b = load_model(tmp_path, dtype="float32")
    la, lb = a.logits(IDS), b.logits(IDS)
    assert la.dtype == torch.float32 and (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.8
    assert (la - lb).abs().max() < 0.25


def test_int8_option_is_close_and_keeps_the_router(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=13, dtype=torch.bfloat16, tokenizer=False)
    exact, q8 = load_model(tmp_path), load_model(tmp_path, quantize="int8")
    a, b = exact.logits(IDS, pool=POOL), q8.logits(IDS, pool=POOL)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert (a - b).abs().max() < 0.5
    assert q8.transformer.int8.nbytes() > 0
    # the router is never quantized: expert choice is the exact model's
    assert all(q8.transformer.int8._w.get((lw.experts.router.data_ptr(), tuple(lw.experts.router.shape))) is None
               for lw in q8.weights.layers)
    with pytest.raises(ValueError, match="quantize"):
        load_model(tmp_path, quantize="int4")


def test_compiled_decode_gemv_matches_eager(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=14, dtype=torch.bfloat16, tokenizer=False)
    eager, comp = load_model(tmp_path), load_model(tmp_path, compile=True)
    for m in (eager, comp):
        m.cache_ = m.new_cache(1, 16)
    rows = {}
    for name, m in (("eager", eager), ("compiled", comp)):
        out = [m.forward(Batch(torch.tensor([t]), [0], [pos], [1], [m.resolve_pool(POOL)]), m.cache_).logits
               for pos, t in enumerate(IDS[:4])]
        rows[name] = torch.cat(out)
    # same math, another float32 summation order, outputs rounded to bf16
    assert torch.allclose(rows["eager"], rows["compiled"], atol=0.05, rtol=0.02)
    assert (rows["eager"].argmax(-1) == rows["compiled"].argmax(-1)).all()


# -- zero copy -----------------------------------------------------------------

def test_weights_are_views_of_the_mapped_file(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=10, dtype=torch.bfloat16, tokenizer=False)
    m = load_model(tmp_path)
    f = next(iter(m.files.files.values()))
    lo = ctypes.addressof(ctypes.c_char.from_buffer(f._mm))
    hi = lo + len(f._mm)
    tensors = [m.weights.embed, m.weights.lm_head] + [t for lw in m.weights.layers for t in
                                                    (lw.q, lw.o, lw.experts.router, lw.experts.experts[3].down)]
    for t in tensors:
        assert lo <= t.data_ptr() < hi
    assert m.weights.layers[0].experts.experts[0].gate_up is not None  # gate and up adjacent: one view


# -- bad checkpoints -----------------------------------------------------------

def test_config_errors_name_file_and_key(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"config.json.*unknown model_type 'llama'"):
        load_model(tmp_path)
    del cfg["num_experts_per_tok"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: missing required key 'num_experts_per_tok'"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_truncated_and_inconsistent_files(tmp_path):
    d = write_checkpoint_dir(tmp_path / "t", emo_config(), tokenizer=False)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* ends at byte .*truncated"):
        load_model(d)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated file"):
        load_model(d)
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        load_model(d)
    # header that lies about a tensor's size
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = "model.layers.0.self_attn.q_proj.weight"
    header[name]["shape"] = [3, 3]
    hb = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has \d+ bytes for shape \[3, 3\]"):
        load_model(d)


def test_shape_mismatch_and_missing_tensor(tmp_path):
    cfg = emo_config()
    d = write_checkpoint_dir(tmp_path / "s", cfg, tokenizer=False)
    t = random_tensors(cfg)
    t["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.1.mlp.experts.3.up_proj.weight' has shape \[5, 5\]"):
        load_model(d)
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.3.up_proj.weight'.* missing"):
        load_model(d)


def test_sharded_index_errors(tmp_path):
    d = write_checkpoint_dir(tmp_path / "sh", emo_config(), shards=3, tokenizer=False)
    m = load_model(d)
    assert len(m.files.files) == 3 and torch.isfinite(m.logits(IDS)).all()
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"'model.extra.weight' is listed in model-00001-of-00003.safetensors but not stored"):
        load_model(d)
    del idx["weight_map"]["model.extra.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    os.remove(d / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00003.safetensors' is missing"):
        load_model(d)


# -- hub -------------------------------------------------------------------------

def test_repo_id_resolves_from_a_local_hub_cache(tmp_path, monkeypatch):
    src = write_checkpoint_dir(tmp_path / "src", emo_config(), seed=11)
    cache = tmp_path / "hub"
    snap = lay_out_hub_cache(src, cache, "acme/tiny-emo")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_model("acme/tiny-emo")
    assert m.path == snap
    assert torch.allclose(m.logits(IDS), load_model(src).logits(IDS))
    from modeling import ModelNotFound
    with pytest.raises(ModelNotFound, match="acme/absent"):
        load_model("acme/absent")


# -- sampling and generation -----------------------------------------------------

def test_stop_strings_across_token_boundaries():
    s = StopChecker(["END"])
    assert s.update("abc E") == ("abc ", False)  # "E" held back: could start END
    assert s.update("abc EN") == ("", False)
    delta, hit = s.update("abc ENDxyz")
    assert hit and delta == "" and s.text == "abc "
    s2 = StopChecker(["\n\n"])
    assert s2.update("a\n") == ("a", False)
    assert s2.update("a\nb") == ("\nb", False)


def test_sampling_filters_and_seeds():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [True, False, False, True]
    # top_p 0.5: the top token alone holds more than half the mass
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [True, False, True, True]
    p = SamplingParams(temperature=1.0, seed=123)
    rows = torch.randn(1, 50).repeat(3, 1)
    a = [sample_next(rows[:1], [p], [p.make_generator()])[0] for _ in range(3)]
    assert len(set(a)) == 1
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.5)


def test_generate_greedy_stops_and_chat_template(tmp_path):
    write_checkpoint_dir(tmp_path, emo_config(), seed=12)
    m = load_model(tmp_path)
    g = m.generate("def add(a, b):", SamplingParams(max_tokens=8, temperature=0))
    assert len(g.token_ids) <= 8 and g.finish_reason in ("length", "stop")
    again = m.generate("def add(a, b):", SamplingParams(max_tokens=8, temperature=0))
    assert again.token_ids == g.token_ids
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.logits([1, 100000])


def test_one_layer_parser_and_one_group_formula():
    """Issue 17: the writers read a tensor's layer through `TensorNames.layer_of`
    (they parsed "model.layers.N" by string, three times), and the config and the
    fingerprint layout share `routing.expert_group` (the formula was written twice)."""
    from modeling.names import TensorNames
    from modeling.layers.routing import RoutingRule, expert_group

    names = TensorNames()
    assert names.layer_of(names.router(12)) == 12
    assert names.layer_of("model.layers.3") == 3
    for top in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.x.weight", "model.norm.weight"):
        assert names.layer_of(top) is None
    assert [expert_group(e, 8, 4) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert RoutingRule(top_k=2, n_group=1).group_of(7, 8) == 0
