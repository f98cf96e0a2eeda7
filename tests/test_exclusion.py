"""Exclusion profiles ("everything but domain X") and selection stability (issue 11):
`emo-subset build --exclude-domain / --exclude-cluster`, the eval table of the
excluded domain's perplexity rise, and bootstrap resampling of the calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from subsetting.cli import main
from tests.checkpoints import emo_config, write_checkpoint_dir, write_domain_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exclusion")
    base = write_checkpoint_dir(root / "tiny-emo", emo_config())
    corpus = write_domain_corpus(root / "corpus.jsonl")
    return {"root": root, "base": base, "corpus": corpus}


def _domain_means(base, corpus):
    from modeling import load_model
    from subsetting.corpus import read_corpus
    from subsetting.fingerprint import Fingerprinter

    model = load_model(base)
    fp = Fingerprinter(model, 512).fit(read_corpus([corpus])).fingerprints_
    labels = np.array(fp.labels)
    return {d: fp.subset(np.flatnonzero(labels == d)).token_mean() for d in ("code", "prose")}


def test_exclude_domain_keeps_the_least_specific_experts(setup, capsys):
    out = setup["root"] / "no-code"
    code = main(["build", str(setup["base"]), "--corpus", str(setup["corpus"]), "--exclude-domain", "code",
                 "--keep", "5", "--out", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    man = json.loads((out / "profile.json").read_text())
    assert man["selection"]["method"] == "exclude-domain"
    assert man["selection"]["params"]["exclude"] == "code"
    assert man["calibration"]["domains"] == ["code", "prose"]
    stab = man["selection"]["stability"]
    assert stab["resamples"] == 8 and 0 <= stab["changed_mean"] <= stab["changed_max"] and "stable" in stab
    # by hand: drop the experts code uses more than prose does (shared expert 7 always stays)
    means = _domain_means(setup["base"], setup["corpus"])
    for layer, kept in man["kept_experts"].items():
        i = int(layer)
        score = means["code"][i] - means["prose"][i]
        routed = sorted(range(7), key=lambda e: (score[e], e))[:4]
        assert kept == sorted(routed + [7]), layer


def test_exclusion_eval_reports_the_rise(setup, capsys):
    out = setup["root"] / "no-prose"
    assert main(["build", str(setup["base"]), "--corpus", str(setup["corpus"]), "--exclude-domain", "prose",
                 "--keep", "4", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--base", str(setup["base"]), "--text", str(setup["corpus"]), "--json", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    (ex,) = res["exclusion"]
    rows = {r["domain"]: r for r in res["rows"]}
    assert ex["excluded"] == "prose" and ex["worst_kept"] == "code"
    assert ex["rise_excluded"] == pytest.approx(rows["prose"]["ppl_profile"] / rows["prose"]["ppl_full"] - 1)
    assert ex["ratio"] == pytest.approx(ex["rise_excluded"] / ex["rise_worst_kept"])
    main(["eval", str(out), "--base", str(setup["base"]), "--text", str(setup["corpus"]), "-q"])
    assert "excluded / worst kept" in capsys.readouterr().out


def test_exclude_cluster(setup, capsys):
    fp = setup["root"] / "calib.npz"
    assert main(["fingerprint", str(setup["base"]), str(setup["corpus"]), "--out", str(fp), "-q"]) == 0
    assert main(["discover", str(fp), "--k", "2", "--components", "4", "-q"]) == 0
    labels = json.loads((setup["root"] / "calib.clusters.json").read_text())["labels"]
    out = setup["root"] / "no-cluster-0"
    assert main(["build", str(setup["base"]), "--fingerprints", str(fp), "--exclude-cluster", "0", "--keep", "5",
                 "--out", str(out), "-q"]) == 0
    man = json.loads((out / "profile.json").read_text())
    assert man["selection"]["params"]["exclude"] == "cluster 0"
    assert man["calibration"]["documents"] == len(labels)


@pytest.mark.parametrize("args,word", [
    (["--exclude-domain", "medicine"], "medicine"),
    (["--exclude-domain", "code", "--domain", "code"], "--domain"),
    (["--exclude-domain", "code", "--method", "random"], "exclude-domain"),
    (["--exclude-cluster", "0"], "--fingerprints"),
    (["--exclude-domain", "code", "--exclude-cluster", "1"], "either"),
    (["--method", "exclude-domain"], "--exclude-domain"),
])
def test_exclusion_bad_input(setup, capsys, args, word):
    out = setup["root"] / "bad"
    code = main(["build", str(setup["base"]), "--corpus", str(setup["corpus"]), "--keep", "5", "--out", str(out),
                 "-q", *args])
    err = capsys.readouterr().err
    assert code == 2 and word in err, err
    assert not out.exists() and not list(setup["root"].glob(".bad*"))


def test_exclusion_of_the_only_domain(setup, tmp_path, capsys):
    only = tmp_path / "code.jsonl"
    only.write_text("\n".join(json.dumps({"text": t, "domain": "code"}) for t in ("def f(): pass", "x = 1 + 2")))
    code = main(["build", str(setup["base"]), "--corpus", str(only), "--exclude-domain", "code", "--keep", "5",
                 "--out", str(tmp_path / "p"), "-q"])
    assert code == 2 and "only 'code'" in capsys.readouterr().err


def _fingerprints(rows: list[list[float]]):
    from subsetting.fingerprint import Fingerprints, Layout

    layout = Layout(num_layers=1, top_k=1, num_original=[4], loaded=[[0, 1, 2, 3]], shared=[[]])
    probs = np.array(rows, dtype=np.float32)[:, None, :]
    n = len(rows)
    return Fingerprints(probs, probs.copy(), np.full(n, 10), ["d"] * n, [""] * n, layout)


def test_stability_flags_a_selection_that_moves_with_the_sample():
    from subsetting.select import Calibration, MeanProbSelector
    from subsetting.stability import resample_stability

    # expert 0 wins every document: no resample changes the choice
    fp = _fingerprints([[0.7, 0.1, 0.1, 0.1]] * 20)
    sel = MeanProbSelector({0: 1}).fit(Calibration(fp.layout, fp))
    st = resample_stability(sel, Calibration(fp.layout, fp), resamples=10)
    assert st.stable and st.changed_mean == 0 and st.warning() is None
    # half the documents want 0, half want 1, about as much: which one is kept depends on the sample
    fp = _fingerprints([[0.5, 0.3, 0.1, 0.1], [0.3, 0.49, 0.1, 0.11]] * 10)
    sel = MeanProbSelector({0: 1}).fit(Calibration(fp.layout, fp))
    st = resample_stability(sel, Calibration(fp.layout, fp), resamples=20, seed=1)
    assert not st.stable and 0 < st.changed_mean <= 1 and st.changed_max == 1
    assert "unstable" in st.warning() and st.to_dict()["most_changed"].keys() <= {"0:0", "0:1"}


def test_build_records_stability_and_warns_when_unstable(setup, capsys):
    out = setup["root"] / "code-only"
    assert main(["build", str(setup["base"]), "--corpus", str(setup["corpus"]), "--domain", "code", "--keep", "4",
                 "--out", str(out), "--json", "--stability", "12"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    stab = json.loads((out / "profile.json").read_text())["selection"]["stability"]
    assert stab["resamples"] == 12
    unstable = [w for w in summary["warnings"] if w.startswith("unstable selection")]
    assert bool(unstable) == (not stab["stable"]) and bool(unstable) == ("unstable selection" in captured.err)
    assert main(["build", str(setup["base"]), "--corpus", str(setup["corpus"]), "--domain", "code", "--keep", "4",
                 "--out", str(out), "--force", "-q", "--stability", "0"]) == 0
    assert "stability" not in json.loads((out / "profile.json").read_text())["selection"]
