"""Selectors reap / easy-ep and profile repair (merge, distill, finetune), on tiny checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling import PoolError, ProfileManifest, load_model
from subsetting.corpus import read_corpus, tokenize
from subsetting.fingerprint import Fingerprinter, Layout
from subsetting.select import SELECTORS, Calibration, parse_keep
from subsetting.writer import write_profile
from tests.checkpoints import emo_config, write_checkpoint_dir, write_tokenizer
from tests.families import hf_logits, stock, write_hf_checkpoint
from tests.test_subset import _write_corpus, env, no_leftovers, run  # noqa: F401 (env: the fixture)
from training.repair import Repairer, RepairParams, parse_steps, sequences
from training.subset_lm import RepairError, SubsetLM

IDS = list(range(2, 60))
pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(full: Path, corpus: Path):
    model = load_model(full)
    docs, toks = tokenize(read_corpus([corpus]), model.tokenizer, 128)
    fp = Fingerprinter(model, 128).fit(docs, toks).fingerprints_
    return model, Calibration(Layout.of(model), fp, toks, model), toks


# -- selectors ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["reap", "easy-ep"])
def test_selectors_follow_the_contract(env, method):
    root, full, corpus = env
    model, cal, _ = _calibration(full, corpus)
    keep = parse_keep(4, cal.layout)
    sel = SELECTORS[method](keep)
    assert sel.fit(cal) is sel
    assert sel.scores_.shape == (3, 8)
    for i, ids in sel.experts_.items():
        assert len(ids) == 4 and 7 in ids  # the shared expert is always kept
        routed = [e for e in range(7)]
        best = sorted(routed, key=lambda e: (-sel.scores_[i, e], e))[:3]
        assert sorted(best + [7]) == ids
    assert (sel.scores_[:, :7] >= 0).all() and sel.scores_[:, :7].sum() > 0
    with pytest.raises(Exception, match="needs calibration text"):
        SELECTORS[method](keep).fit(Calibration(cal.layout))


def test_reap_is_the_mean_over_routed_tokens_and_easy_ep_a_weighted_sum(env):
    """Recomputed by hand on the full forward (one document, so no batching effects)."""
    root, full, corpus = env
    model, cal, toks = _calibration(full, corpus)
    one = Calibration(cal.layout, cal.fingerprints, toks[:1], model)
    reap = SELECTORS["reap"](parse_keep(4, cal.layout)).fit(one).scores_
    easy = SELECTORS["easy-ep"](parse_keep(4, cal.layout)).fit(one).scores_
    lm = SubsetLM(model)
    cap: list = []
    with torch.no_grad():
        lm(torch.tensor([toks[0]]), capture=cap)
        i, h = cap[0]
        r = lm.route(i, h)
        outs = lm.experts_out(i, h).norm(dim=-1)  # [E, T]
        y = lm.moe(i, h)
    # x is the residual before the MoE: recover it from the layer's attention output
    sums, counts = torch.zeros(8), torch.zeros(8)
    for t in range(h.shape[0]):
        for j in range(r.indices.shape[1]):
            s = int(r.indices[t, j])
            sums[s] += r.weights[t, j] * outs[s, t]
            counts[s] += 1
    want = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros(8))
    torch.testing.assert_close(torch.tensor(reap[0]).float(), want, atol=1e-4, rtol=1e-4)
    assert (easy[0] <= sums.numpy() + 1e-6).all() and (easy[0] >= 0).all()  # weights 1 - cos lie in [0, 2]
    assert y.shape == h.shape


# -- the trainable forward --------------------------------------------------------------


def test_subset_lm_equals_the_model_on_a_pool(env):
    root, full, _ = env
    model = load_model(full)
    pool = {0: [0, 2, 4, 7], 1: [1, 3, 5, 7], 2: [0, 1, 2, 7]}
    slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in pool.items()}
    lm = SubsetLM(model, slots)
    assert lm.check_against(model, IDS, pool) < 1e-4
    assert SubsetLM(model).check_against(model, IDS, None) < 1e-4


def test_subset_lm_equals_olmoe(tmp_path):
    write_hf_checkpoint(tmp_path / "olmoe", "olmoe")
    model = load_model(tmp_path / "olmoe")
    assert SubsetLM(model).check_against(model, IDS, None) < 1e-4


def test_families_repair_cannot_follow_are_refused(tmp_path):
    write_hf_checkpoint(tmp_path / "oss", "gpt_oss")
    with pytest.raises(RepairError, match="does not support"):
        SubsetLM(load_model(tmp_path / "oss"))


# -- the steps, one by one -----------------------------------------------------------------


def _ce(lm, seqs) -> float:
    with torch.no_grad():
        tot = n = 0
        for s in seqs:
            lg = lm(torch.tensor([s]))[0]
            tot += float(F.cross_entropy(lg[:-1], torch.tensor(s[1:]), reduction="sum"))
            n += len(s) - 1
    return tot / n


def _kl(lm, teacher, seqs) -> float:
    with torch.no_grad():
        out = []
        for s in seqs:
            t, p = F.log_softmax(teacher(torch.tensor([s]))[0], -1), F.log_softmax(lm(torch.tensor([s]))[0], -1)
            out.append(float((t.exp() * (t - p)).sum(-1).mean()))
    return sum(out) / len(out)


@pytest.fixture(scope="module")
def kept(env):
    root, full, corpus = env
    model, cal, toks = _calibration(full, corpus)
    experts = SELECTORS["mean-prob"](parse_keep(4, cal.layout)).fit(cal).experts_
    slots = {i: [model.layer_experts(i).ids.index(e) for e in ids] for i, ids in experts.items()}
    return model, experts, slots, toks


def test_merge_folds_every_dropped_expert_into_a_kept_one(kept):
    model, experts, slots, toks = kept
    rep = Repairer(("merge",), RepairParams(merge_tokens=200)).fit(model, slots, toks, teacher=model)
    rec = rep.record_["steps"][0]
    assert rec["step"] == "merge" and rec["tokens"] <= 200 and rec["peak_rss_bytes"] > 0
    for i, ids in experts.items():
        folded = rec["folded"][str(i)]
        dropped = sorted(e for e in range(7) if e not in ids)
        assert sorted(e for v in folded.values() for e in v) == dropped
        assert set(map(int, folded)) <= set(ids) - {7}  # into kept routed experts, never the shared one
        base = model.layer_experts(i)
        for s, e in enumerate(ids):
            same = torch.equal(rep.lm_.gate[str(i)][s], base.experts[base.ids.index(e)].gate.float())
            assert same == (str(e) not in folded)  # only experts that took others in changed
    # merging is a weighted mean of aligned neurons: folding an expert into itself changes nothing
    lm = SubsetLM(model, {i: list(range(8)) for i in experts})
    assert lm.check_against(model, IDS, None) < 1e-4


def test_distill_trains_only_router_rows_and_lowers_kl(kept):
    model, experts, slots, toks = kept
    teacher = SubsetLM(model)
    seqs = sequences(toks, 128)
    before = SubsetLM(model, slots)
    rep = Repairer(("distill",), RepairParams(distill_steps=30, distill_lr=3e-2, batch=4)).fit(
        model, slots, toks, teacher=model)
    for i in experts:
        k = str(i)
        assert torch.equal(rep.lm_.gate[k], before.gate[k]) and torch.equal(rep.lm_.down[k], before.down[k])
        assert not torch.equal(rep.lm_.router[k], before.router[k])
    assert _kl(rep.lm_, teacher, seqs) < _kl(before, teacher, seqs)


def test_finetune_lowers_next_token_loss(kept):
    model, experts, slots, toks = kept
    seqs = sequences(toks, 128)
    before = _ce(SubsetLM(model, slots), seqs)
    seen: list = []
    rep = Repairer(("finetune",), RepairParams(finetune_steps=30, finetune_lr=1e-2, batch=4),
                   on_progress=lambda *a: seen.append(a)).fit(model, slots, toks)
    assert _ce(rep.lm_, seqs) < before
    assert [a[1] for a in seen] == list(range(1, 31)) and all(a[4] > 0 for a in seen)  # step, tokens/s
    rec = rep.record_["steps"][0]
    assert rec["trained"] == ["router", "experts"] and rec["steps"] == 30 and rec["tokens"] > 0


def test_written_profile_runs_exactly_the_repaired_weights(kept, tmp_path):
    model, experts, slots, toks = kept
    rep = Repairer(("merge", "finetune"), RepairParams(merge_tokens=100, finetune_steps=5, finetune_lr=1e-2)).fit(
        model, slots, toks, teacher=model)
    man = write_profile(model, tmp_path / "p", "p", experts, overrides=rep.tensors_, repair=rep.record_)
    assert [s["step"] for s in ProfileManifest.read(tmp_path / "p").repair["steps"]] == ["merge", "finetune"]
    prof = load_model(tmp_path / "p")
    with torch.no_grad():
        want = rep.lm_(torch.tensor([IDS]))[0]
    torch.testing.assert_close(prof.logits(IDS), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prof.logits(IDS), model.logits(IDS, pool=experts), atol=1e-3)
    assert man.repair["steps"][1]["step"] == "finetune"


def test_steps_parse_in_order_and_bad_specs_are_named():
    assert parse_steps("finetune,merge") == ("merge", "finetune")
    for bad in ("", "merge,merge", "prune"):
        with pytest.raises(RepairError, match="--repair"):
            parse_steps(bad)


# -- the CLI end to end: build --repair, repair, stock transformers, GGUF, the server's refusal ----


def test_olmoe_repaired_profile_loads_in_stock_transformers_and_exports_to_gguf(tmp_path, capsys):
    base = tmp_path / "olmoe"
    write_hf_checkpoint(base, "olmoe", num_key_value_heads=4)  # llama.cpp's olmoe has no GQA
    write_tokenizer(base, 300)
    corpus = _write_corpus(tmp_path / "c.jsonl")
    out = tmp_path / "prof"
    code, stdout, err = run(["build", base, "--out", out, "--corpus", corpus, "--keep", 4, "--repair",
                             "merge,distill,finetune", "--distill-steps", 3, "--finetune-steps", 3,
                             "--stability", 0, "--json"], capsys)
    assert code == 0, err
    assert "distill" in err and "tokens/s" in err  # progress: steps, loss, tokens per second
    summ = json.loads(stdout)
    assert [s["step"] for s in summ["repair"]["steps"]] == ["merge", "distill", "finetune"]
    man = ProfileManifest.read(out)
    assert man.repair["params"]["distill_steps"] == 3 and man.repair["data"]["documents"] == 12
    assert run(["verify", out, "--quiet"])[0] == 0
    hf = stock(out)
    ours = load_model(out)
    torch.testing.assert_close(ours.logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours.logits(IDS), load_model(base).logits(IDS, pool=man.pool()), atol=1e-3)
    pytest.importorskip("gguf")
    assert run(["export-gguf", out, "--out", tmp_path / "p.gguf", "--quiet"])[0] == 0
    assert (tmp_path / "p.gguf").stat().st_size > 0

    # repairing it again (finetune needs no base) keeps the earlier record
    again = tmp_path / "again"
    code, _, err = run(["repair", out, "--corpus", corpus, "--repair", "finetune", "--finetune-tokens", 100,
                        "--out", again, "--quiet"], capsys)
    assert code == 0, err
    rec = ProfileManifest.read(again).repair
    assert rec["steps"][0]["steps"] == 1 and rec["earlier"]["steps"][0]["step"] == "merge"
    assert ProfileManifest.read(again).kept_experts == man.kept_experts

    # the server never shares repaired experts with the base (or other profiles) by id
    model = load_model(base)
    with pytest.raises(PoolError, match="repaired"):
        model.add_experts_from(out)


def test_repair_of_an_existing_profile_with_its_base(env, capsys):
    root, full, corpus = env
    plain = root / "plain"
    assert run(["build", full, "--out", plain, "--corpus", corpus, "--keep", 4, "--quiet"])[0] == 0
    out = root / "repaired"
    code, _, err = run(["repair", plain, "--base", full, "--corpus", corpus, "--domain", "code", "--repair",
                        "merge,distill", "--distill-steps", 2, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    man = ProfileManifest.read(out)
    assert man.repair["data"]["domain"] == "code" and man.base == ProfileManifest.read(plain).base
    assert man.selection == ProfileManifest.read(plain).selection


def test_bad_repair_inputs_exit_2_with_a_message_and_leave_no_folder(env, capsys, tmp_path):
    root, full, corpus = env
    plain = root / "plain-bad"
    assert run(["build", full, "--out", plain, "--corpus", corpus, "--keep", 4, "--quiet"])[0] == 0
    other = write_checkpoint_dir(tmp_path / "other", emo_config(rope_theta=5000.0), seed=9)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    cases = [
        (["build", full, "--out", out, "--keep", 4, "--method", "random", "--repair", "finetune"],
         "needs calibration text"),
        (["build", full, "--out", out, "--corpus", corpus, "--keep", 4, "--repair", "prune"], "--repair 'prune'"),
        (["build", full, "--out", out, "--corpus", empty, "--keep", 4, "--repair", "distill"], "empty"),
        (["build", full, "--out", out, "--corpus", corpus, "--domain", "law", "--keep", 4, "--repair", "merge"],
         "no documents of domain 'law'"),
        (["build", full, "--out", out, "--corpus", corpus, "--keep", 4, "--repair", "finetune",
          "--finetune-steps", 0], "--finetune-steps must be at least 1"),
        (["repair", plain, "--corpus", corpus, "--repair", "distill", "--out", out], "give --base MODEL"),
        (["repair", plain, "--base", other, "--corpus", corpus, "--repair", "merge", "--out", out],
         "cut from base"),
        (["repair", plain, "--corpus", empty, "--repair", "finetune", "--out", out], "empty"),
        (["repair", tmp_path, "--corpus", corpus, "--repair", "finetune", "--out", out], "not a profile folder"),
    ]
    for args, msg in cases:
        code, _, err = run([*args, "--quiet"], capsys)
        assert code == 2 and msg in err, (args, err)
        no_leftovers(tmp_path, "out")
