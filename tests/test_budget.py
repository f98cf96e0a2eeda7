"""Per-layer budgets: `emo-subset build --budget N` spends N experts over the MoE layers by score."""

from __future__ import annotations

import numpy as np
import pytest

from modeling import ProfileManifest, load_model
from subsetting.errors import SubsetError
from subsetting.fingerprint import Layout
from subsetting.select import allocate_budget
from tests.checkpoints import write_tokenizer
from tests.families import write_hf_checkpoint
from tests.test_subset import _write_corpus, assert_profile_equals_pool, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _layout(layers=3, experts=8, shared=()) -> Layout:
    return Layout(layers, 2, [experts] * layers, [list(range(experts))] * layers, [list(shared)] * layers)


def test_allocation_gives_the_minimum_then_the_best_scores_anywhere():
    lay = _layout()
    scores = np.zeros((3, 8))
    scores[0] = [8, 1, 1, 1, 1, 1, 1, 1]  # layer 0: mass on one expert
    scores[1] = [1] * 8  # layer 1: spread: its experts are worth more than layer 0's tail
    scores[2] = [4, 4, 1, 1, 1, 1, 1, 1]
    keep = allocate_budget(scores, lay, 12, {0: 2, 1: 2, 2: 2})
    assert sum(keep.values()) == 12 and min(keep.values()) >= 2
    assert keep[1] > keep[0]
    assert allocate_budget(scores, lay, 6, {0: 2, 1: 2, 2: 2}) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(SubsetError, match="less than the 6 experts"):
        allocate_budget(scores, lay, 5, {0: 2, 1: 2, 2: 2})
    with pytest.raises(SubsetError, match="more than the 24"):
        allocate_budget(scores, lay, 25, {0: 2, 1: 2, 2: 2})


def test_budget_profile_loads_here_and_gguf_refuses_it(tmp_path, capsys):
    base = tmp_path / "olmoe"
    write_hf_checkpoint(base, "olmoe", num_key_value_heads=4)
    write_tokenizer(base, 300)
    corpus = _write_corpus(tmp_path / "c.jsonl")
    out = tmp_path / "b"
    assert run(["build", base, "--out", out, "--corpus", corpus, "--budget", 11, "--keep", 3, "--method", "reap",
                "--quiet"])[0] == 0
    man = assert_profile_equals_pool(base, out, atol=1e-4)
    counts = [len(v) for v in man.kept_experts.values()]
    assert sum(counts) == 11 and min(counts) >= 3 and len(set(counts)) > 1
    assert man.selection["params"]["budget"] == 11
    code, _, err = run(["export-gguf", out, "--out", tmp_path / "b.gguf"], capsys)
    assert code == 2 and "different expert counts" in err
    code, _, err = run(["build", base, "--out", tmp_path / "r", "--corpus", corpus, "--budget", 11, "--method",
                        "random", "--quiet"], capsys)
    assert code == 2 and "--budget" in err
