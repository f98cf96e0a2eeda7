"""Issue 17: withdrawing a profile's bytes re-points EVERY per-slot record (expert
matrices, router row, correction bias, router logit bias) to a sound source, read
with that source's own quantization. Profiles built by emo-subset; no base, so the
re-pointing has to land on other profiles (the hard case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeling import load_model
from subsetting.cli import main
from tests.checkpoints import emo_config, write_checkpoint_dir
from tests.families import IDS, write_hf_checkpoint

POOLS = {"a": [0, 1, 2, 7], "b": [2, 3, 4, 7], "c": [3, 4, 5, 7]}  # 7: the shared expert of EMO


def _profiles(base: Path, root: Path, layers: int, *extra: str) -> dict[str, Path]:
    out = {}
    for name, ids in POOLS.items():
        ef = root / f"{name}.json"
        ef.write_text(json.dumps({str(i): ids for i in range(layers)}))
        out[name] = root / name
        assert main(["build", str(base), "--out", str(out[name]), "--experts-file", str(ef), "--name", name, "-q",
                     *extra]) == 0
    return out


def _slot_tensors(le, slot: int) -> list[torch.Tensor]:
    return le.slots[slot].sourced()  # the slot's record: expert matrices, router row, bias entries


def _points_into(model, folder: Path, t: torch.Tensor) -> bool:
    ranges = [r for f in model.sources[str(folder)].files.values() if (r := f.address_range()) is not None]
    p = t.data_ptr()
    return any(a <= p < b for a, b in ranges)


def _withdraw_and_check(profs: dict[str, Path]) -> None:
    m = load_model(profs["a"])
    for name in ("b", "c"):
        m.add_experts_from(profs[name])
    clean = load_model(profs["a"])
    clean.add_experts_from(profs["c"])
    assert m.withdraw(profs["b"]) == {}
    for i, lw in enumerate(m.weights.layers):
        le = lw.experts
        if le is None:
            continue
        assert str(profs["b"]) not in le.sources
        for slot in range(len(le.ids)):
            bad = [t.shape for t in _slot_tensors(le, slot) if _points_into(m, profs["b"], t)]
            assert not bad, f"layer {i} expert {le.ids[slot]}: still reads the withdrawn file ({bad})"
    torch.testing.assert_close(m.logits(IDS), clean.logits(IDS), atol=0, rtol=0)


def test_withdrawal_repoints_gpt_oss_router_bias(tmp_path):
    """Before: `_withdraw` re-pointed experts, router rows and correction-bias rows,
    not gpt-oss's router logit bias: the withdrawn file's bias bytes kept serving."""
    base = tmp_path / "base"
    write_hf_checkpoint(base, "gpt_oss", seed=7)
    m = load_model(base)
    assert m.layer_experts(0).logit_bias is not None
    _withdraw_and_check(_profiles(base, tmp_path, m.config.num_layers))


def test_withdrawal_onto_an_int4_profile_reads_it_as_int4(tmp_path):
    """Before: the re-pointing read a quantized source without its quantization
    config (packed bytes taken for plain weights, or no weights found at all)."""
    base = write_checkpoint_dir(tmp_path / "base", emo_config(hidden_size=64, intermediate_size=32, head_dim=16),
                                seed=5)
    _withdraw_and_check(_profiles(base, tmp_path, 3, "--quantize", "int4", "--group-size", "32"))


def test_expert_store_replaces_records_and_counts_bytes_per_source(tmp_path):
    """The store holds one record per slot: withdrawing a source REPLACES the
    records it served (new Expert objects, whose tensors read the other source),
    never mutates the old ones (the kernels key prepared weights on the Expert
    object), and its bytes move to the sources that serve the slots now."""
    base = write_checkpoint_dir(tmp_path / "base", emo_config(hidden_size=64, intermediate_size=32, head_dim=16),
                                seed=5)
    profs = _profiles(base, tmp_path, 3)
    m = load_model(profs["a"])
    for name in ("b", "c"):
        m.add_experts_from(profs[name])
    store = m.experts
    assert all(m.weights.layers[i].experts is le for i, le in enumerate(store.layers))
    by_source = store.bytes_by_source()
    total = sum(m.expert_bytes(i, e) for i, le in enumerate(store.layers) if le is not None for e in le.ids)
    assert sum(by_source.values()) == total and by_source[str(profs["b"])] > 0
    before = {(i, rec.orig_id): rec for i, le in enumerate(store.layers) if le is not None for rec in le.slots
              if rec.source == str(profs["b"])}
    ptrs = {k: [t.data_ptr() for t in rec.sourced()] for k, rec in before.items()}
    assert before and m.withdraw(profs["b"]) == {}
    assert store.bytes_by_source()[str(profs["b"])] == 0
    assert sum(store.bytes_by_source().values()) == total
    for (i, e), old in before.items():
        le = store.layers[i]
        new = le.slots[le.slot_of(e)]
        assert new is not old and new.expert is not old.expert and new.source != str(profs["b"])
        assert le.experts[le.slot_of(e)] is new.expert and le.router.data_ptr() != 0
        assert [t.data_ptr() for t in old.sourced()] == ptrs[(i, e)]  # the old record is untouched
        assert all(_points_into(m, profs["b"], t) for t in old.sourced())
