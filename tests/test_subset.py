"""emo-subset: fingerprints, discovery, selection, the profile writer and the CLI, on tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling import ProfileManifest, load_model
from subsetting.cli import main
from subsetting.corpus import read_corpus
from subsetting.discover import DomainDiscovery
from subsetting.fingerprint import Fingerprints, Layout
from tests.checkpoints import emo_config, lay_out_hub_cache, write_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
IDS = list(range(2, 60))

DOCS = {
    "code": ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
             "int main(void) { printf(\"%d\\n\", 1 + 2); return 0; }", "def sub(a, b):\n    return a - b\n"],
    "prose": ["The quick brown fox jumps over the lazy dog.", "A licence grants permission to copy the work.",
              "The lazy dog sleeps while the quick fox runs.", "Permission to copy is granted by a licence."],
    "math": ["12 + 30 = 42; 7 * 6 = 42;", "100 - 58 = 42.", "7 * 6 = 42; 12 + 30 = 42.", "30 + 12 = 42"],
}


def _write_corpus(path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"text": t, "domain": d}) for d, ts in DOCS.items() for t in ts) + "\n")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("subset")
    full = write_checkpoint_dir(root / "full", emo_config(), seed=3)
    corpus = _write_corpus(root / "corpus.jsonl")
    return root, full, corpus


def run(args, capsys=None) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


def no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")], list(parent.iterdir())


def assert_profile_equals_pool(full: Path, profile: Path, atol: float = 1e-5) -> ProfileManifest:
    man = ProfileManifest.read(profile)
    base, prof = load_model(full), load_model(profile)
    for i, ids in man.kept_experts.items():
        assert prof.expert_ids(i) == ids
    a, b = prof.logits(IDS), base.logits(IDS, pool=man.pool())
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    return man


# -- the key equality ------------------------------------------------------------------


def test_profile_logits_equal_pool_restricted_full_model_with_sharded_output(env, capsys):
    root, full, corpus = env
    out = root / "p-code"
    code, stdout, _ = run(["build", full, "--out", out, "--name", "code", "--corpus", corpus, "--domain", "code",
                           "--keep", 4, "--max-shard-bytes", 30000, "--json", "--quiet"], capsys)
    assert code == 0
    summ = json.loads(stdout)
    man = assert_profile_equals_pool(full, out)
    assert len(man.shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert summ["shards"] == man.shards
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts_per_layer"] == [4, 4, 4] and cfg["num_shared_experts"] == 1
    assert all(7 in ids for ids in man.kept_experts.values())  # the shared expert (last) is always kept
    assert man.selection["method"] == "mean-prob" and man.calibration["domains"] == ["code"]
    assert man.calibration["documents"] == 4 and man.calibration["tokens"] > 0
    assert set(man.coverage) == {0, 1, 2} and all(0 < c <= 1 for c in man.coverage.values())
    assert np.array(man.centroid).shape == (3, 8)
    assert man.base == load_model(full).identity
    assert man.bytes["total"] == man.bytes["experts"] + man.bytes["non_expert"]
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # coverage is the kept share of the full model's mean routing mass over routed experts
    fp = json.loads(stdout)["calibration"]
    assert fp["documents"] == 4


def test_profile_loads_in_the_independent_float64_reference(env):
    try:
        from tests.reference import Reference
    except ImportError:
        pytest.skip("tests/reference.py (the lead's float64 reference) is not there yet")
    root, full, corpus = env
    out = root / "p-ref"
    assert run(["build", full, "--out", out, "--corpus", corpus, "--keep", 3, "--quiet"]) [0] == 0
    man = ProfileManifest.read(out)
    ids = IDS[:12]
    ref_prof = Reference(out).logits(ids)
    ref_full = Reference(full).logits(ids, pool=man.pool())
    np.testing.assert_allclose(ref_prof, ref_full, atol=1e-9)
    np.testing.assert_allclose(load_model(out).logits(ids).numpy(), ref_prof, atol=1e-4)


@pytest.mark.parametrize("method", ["layerwise", "output-aware", "random"])
def test_every_method_writes_a_correct_profile(env, method):
    root, full, corpus = env
    out = root / f"p-{method}"
    assert run(["build", full, "--out", out, "--corpus", corpus, "--keep", 5, "--method", method, "--quiet"])[0] == 0
    man = assert_profile_equals_pool(full, out)
    assert man.selection["method"] == method
    assert all(len(v) == 5 and 7 in v for v in man.kept_experts.values())


def test_random_is_seeded_and_needs_no_corpus(env):
    root, full, _ = env
    for d, seed in (("r1", 1), ("r1b", 1), ("r2", 2)):
        assert run(["build", full, "--out", root / d, "--keep", 4, "--method", "random", "--seed", seed, "-q"])[0] == 0
    k = {d: ProfileManifest.read(root / d).kept_experts for d in ("r1", "r1b", "r2")}
    assert k["r1"] == k["r1b"] and k["r1"] != k["r2"]


def test_layerwise_chooses_layers_on_already_pruned_earlier_layers(env):
    from subsetting.select import Calibration, LayerwiseSelector, MeanProbSelector, parse_keep
    from subsetting.fingerprint import Fingerprinter

    root, full, corpus = env
    model = load_model(full)
    docs = read_corpus([corpus])[::3]
    fper = Fingerprinter(model).fit(docs)
    keep = parse_keep(4, Layout.of(model))
    cal = Calibration(Layout.of(model), fper.fingerprints_, fper.token_lists_, model)
    lw = LayerwiseSelector(keep).fit(cal)
    mp = MeanProbSelector(keep).fit(cal)
    assert lw.experts_[0] == mp.experts_[0]  # layer 0 sees the same inputs
    # layer 1's scores are measured on a pruned layer 0: equal to a pool-restricted forward's router softmax
    pool = {0: lw.experts_[0]}
    sums, n = 0, 0
    for t in fper.token_lists_:
        cache = model.new_cache(1, len(t))
        from modeling import Batch
        b = Batch(torch.tensor(t), [0], [0], [len(t)], [model.resolve_pool(pool)])
        p = model.forward(b, cache, logits_at="all", collect_router_probs=True).router_probs[1]
        sums, n = sums + p.double().sum(0), n + len(t)
    np.testing.assert_allclose(lw.scores_[1][:8], (sums / n).numpy(), atol=1e-5)


def test_experts_file_fused_source_and_profile_of_a_profile(tmp_path):
    full = write_checkpoint_dir(tmp_path / "fused", emo_config(), seed=5, fused=True)
    ef = tmp_path / "experts.json"
    ef.write_text(json.dumps({"0": [1, 2, 5, 7], "1": [0, 3, 4, 6, 7], "2": [2, 3, 4, 7]}))
    p1 = tmp_path / "p1"
    assert run(["build", full, "--out", p1, "--experts-file", ef, "-q"])[0] == 0
    man = assert_profile_equals_pool(full, p1)
    assert man.kept_experts == {0: [1, 2, 5, 7], 1: [0, 3, 4, 6, 7], 2: [2, 3, 4, 7]}
    assert man.coverage == {} and man.selection["method"] == "experts-file"
    # written per expert, not fused
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in load_model(p1).files.names()
    # a profile of the profile: ids stay original ids
    ef2 = tmp_path / "experts2.json"
    ef2.write_text(json.dumps({"0": [2, 5, 7], "1": [3, 6, 7], "2": [2, 4, 7]}))
    p2 = tmp_path / "p2"
    assert run(["build", p1, "--out", p2, "--experts-file", ef2, "-q"])[0] == 0
    man2 = assert_profile_equals_pool(full, p2)
    assert man2.num_experts_original == [8, 8, 8] and man2.base == man.base
    corpus = _write_corpus(tmp_path / "c.jsonl")
    p3 = tmp_path / "p3"
    assert run(["build", p1, "--out", p3, "--corpus", corpus, "--keep", 3, "-q"])[0] == 0
    man3 = assert_profile_equals_pool(full, p3)
    assert all(set(v) <= set(man.kept_experts[i]) for i, v in man3.kept_experts.items())
    assert len(man3.centroid[0]) == 8


# -- fingerprint, discover, build from a cluster ------------------------------------------


def test_fingerprint_discover_and_build_from_a_cluster(env, capsys):
    root, full, corpus = env
    fp_path = root / "fp.npz"
    code, out, _ = run(["fingerprint", full, corpus, "--out", fp_path, "--json", "-q"], capsys)
    assert code == 0 and json.loads(out)["documents"] == 12
    fp = Fingerprints.load(fp_path)
    assert fp.probs.shape == (12, 3, 8) and fp.topk_freq.shape == (12, 3, 8)
    # per layer the routed group sums to 1 and the shared expert has probability 1; k-1 routed + 1 shared chosen
    np.testing.assert_allclose(fp.probs[:, :, :7].sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(fp.probs[:, :, 7], 1, atol=1e-6)
    np.testing.assert_allclose(fp.topk_freq.sum(-1), 3, atol=1e-5)
    # the layer-by-layer pass equals the model's own forward pass
    model = load_model(full)
    t = model.tokenizer.encode(DOCS["code"][0])[:512]
    rp = model.forward(__import__("modeling").Batch(torch.tensor(t), [0], [0], [len(t)]), model.new_cache(1, len(t)),
                       logits_at="all", collect_router_probs=True).router_probs
    np.testing.assert_allclose(fp.probs[0], np.stack([p.mean(0).numpy() for p in rp]), atol=1e-5)
    assert fp.labels[0] == "code"
    code, out, _ = run(["discover", fp_path, "--k", 3, "--json", "-q"], capsys)
    assert code == 0
    s = json.loads(out)
    assert s["k"] == 3 and len(s["labels"]) == 12 and sum(c["size"] for c in s["clusters"]) == 12
    assert Path(s["clusters_file"]).is_file() and Path(s["summary_file"]).read_text().startswith("# Discovered")
    c0 = s["labels"][0]
    prof = root / "p-cluster"
    assert run(["build", full, "--out", prof, "--fingerprints", fp_path, "--cluster", c0, "--keep", 4, "-q"])[0] == 0
    man = assert_profile_equals_pool(full, prof)
    assert man.calibration["documents"] == s["labels"].count(c0)
    assert man.selection["params"]["cluster"] == c0


def test_discover_recovers_synthetic_domains():
    rng = np.random.default_rng(0)
    L, E, n = 4, 16, 30
    layout = Layout(L, 2, [E] * L, [list(range(E))] * L, [[]] * L)
    probs, labels = [], []
    for d in range(3):
        base = rng.dirichlet(np.full(E, 0.3), size=L)
        for _ in range(n):
            probs.append(np.stack([rng.dirichlet(base[i] * 40 + 0.01) for i in range(L)]))
            labels.append(f"d{d}")
    probs = np.array(probs, np.float32)
    fp = Fingerprints(probs, probs, np.full(len(probs), 10), labels, ["x"] * len(probs), layout)
    dd = DomainDiscovery("auto").fit(fp)
    s = dd.summary(fp)
    assert dd.k_ == 3 and s["adjusted_rand_index"] > 0.95
    assert DomainDiscovery(3).fit(fp).summary(fp)["adjusted_rand_index"] > 0.95


# -- eval, inspect, verify, force --------------------------------------------------------


def test_eval_inspect_verify_and_force(env, capsys):
    root, full, corpus = env
    out = root / "p-ops"
    assert run(["build", full, "--out", out, "--corpus", corpus, "--domain", "prose", "--keep", 4, "-q"], capsys)[0] == 0
    code, stdout, _ = run(["eval", out, "--base", full, "--text", corpus, "--json", "-q"], capsys)
    assert code == 0
    rows = json.loads(stdout)["rows"]
    assert {r["domain"] for r in rows} == {"code", "prose", "math"}
    for r in rows:
        assert r["ppl_profile"] > 1 and r["ppl_full"] > 1 and r["ppl_random"] > 1
        assert r["retention"] == pytest.approx(r["ppl_full"] / r["ppl_profile"])
    code, stdout, _ = run(["inspect", out, "--json", "-q"], capsys)
    assert code == 0 and json.loads(stdout)["name"] == "p-ops"
    assert run(["verify", out, "-q"], capsys)[0] == 0
    # an existing profile is not overwritten without --force
    before = (out / "profile.json").read_text()
    code, _, err = run(["build", full, "--out", out, "--corpus", corpus, "--keep", 5, "-q"], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (out / "profile.json").read_text() == before
    assert run(["build", full, "--out", out, "--corpus", corpus, "--keep", 5, "--force", "-q"], capsys)[0] == 0
    assert all(len(v) == 5 for v in ProfileManifest.read(out).kept_experts.values())
    assert not [p for p in root.iterdir() if ".p-ops." in p.name]
    # a flipped byte is detected
    shard = out / next(iter(ProfileManifest.read(out).shards))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, stdout, err = run(["verify", out, "--json", "-q"], capsys)
    assert code == 1 and json.loads(stdout)["ok"] is False and "sha256 differs" in err


def test_verify_finds_edits_of_the_manifest_and_of_config_json(env, capsys, tmp_path):
    """profile.json itself is covered: changing the kept ids (what the server routes by) or
    config.json fails `verify`, not only a changed shard byte; re-indenting the manifest does not."""
    import shutil

    root, full, corpus = env
    out = tmp_path / "p-man"
    assert run(["build", full, "--out", out, "--keep", 4, "--method", "random", "-q"], capsys)[0] == 0
    man = json.loads((out / "profile.json").read_text())
    assert set(man["files"]) >= {"config.json", "tokenizer.json"} and len(man["manifest_sha256"]) == 64
    assert run(["verify", out, "-q"], capsys)[0] == 0

    reindented = tmp_path / "p-reindent"
    shutil.copytree(out, reindented)
    (reindented / "profile.json").write_text(json.dumps(man, indent=4, sort_keys=True))
    assert run(["verify", reindented, "-q"], capsys)[0] == 0

    edited = tmp_path / "p-edit"
    shutil.copytree(out, edited)
    m = dict(man, kept_experts={**man["kept_experts"], "0": [0, 1, 2, 7]})
    assert m["kept_experts"] != man["kept_experts"]
    (edited / "profile.json").write_text(json.dumps(m, indent=1))
    code, stdout, err = run(["verify", edited, "--json", "-q"], capsys)
    assert code == 1 and json.loads(stdout)["ok"] is False and "edited after it was written" in err

    cfg_edit = tmp_path / "p-cfg"
    shutil.copytree(out, cfg_edit)
    cfg = json.loads((cfg_edit / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1
    (cfg_edit / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["verify", cfg_edit, "-q"], capsys)
    assert code == 1 and "config.json: sha256 differs" in err

    unsealed = tmp_path / "p-old"
    shutil.copytree(out, unsealed)
    (unsealed / "profile.json").write_text(json.dumps({k: v for k, v in man.items() if k != "manifest_sha256"}))
    code, _, err = run(["verify", unsealed, "-q"], capsys)
    assert code == 1 and "no manifest_sha256" in err


# -- bad input ---------------------------------------------------------------------------


def _bad_checkpoints(root: Path) -> dict[str, Path]:
    unknown = write_checkpoint_dir(root / "unknown", emo_config(), tokenizer=False)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["model_type"] = "llama"
    (unknown / "config.json").write_text(json.dumps(cfg))
    missing = root / "missing"
    write_checkpoint_dir(missing, emo_config(), shards=1)
    from safetensors.torch import load_file, save_file

    t = load_file(str(missing / "model.safetensors"))
    del t["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(t, str(missing / "model.safetensors"))
    return {"unknown": unknown, "missing": missing}


def test_bad_inputs_exit_2_with_a_message_and_leave_no_folder(env, capsys, tmp_path):
    root, full, corpus = env
    bad = _bad_checkpoints(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    blank_txt = tmp_path / "blank"
    blank_txt.mkdir()
    (blank_txt / "a.txt").write_text("   \n")
    undecodable = tmp_path / "latin1.txt"
    undecodable.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    out_of_range = tmp_path / "oor.json"
    out_of_range.write_text(json.dumps({"0": [0, 1, 2, 7], "1": [0, 1, 9, 7], "2": [1, 2, 3, 7]}))
    no_shared = tmp_path / "noshared.json"
    no_shared.write_text(json.dumps({"0": [0, 1, 2, 3], "1": [0, 1, 2, 7], "2": [1, 2, 3, 7]}))
    cases = [
        (["--corpus", empty, "--keep", 4], "no documents"),
        (["--corpus", blank_txt, "--keep", 4], "no documents"),
        (["--corpus", undecodable, "--keep", 4], "not valid UTF-8"),
        (["--corpus", tmp_path / "absent.jsonl", "--keep", 4], "no such corpus"),
        (["--corpus", corpus, "--domain", "legal", "--keep", 4], "no documents of domain 'legal'"),
        (["--experts-file", out_of_range], "expert id 9 is out of range"),
        (["--experts-file", no_shared], "shared expert 7"),
        (["--corpus", corpus, "--keep", 2], "smaller than the 3 experts"),
        (["--corpus", corpus, "--keep", 9], "larger than the 8 experts"),
        (["--corpus", corpus, "--keep", "lots"], "--keep 'lots'"),
        (["--corpus", corpus, "--keep", 4, "--method", "magic"], "--method 'magic'"),
        (["--keep", 4], "needs calibration text"),
    ]
    for extra, msg in cases:
        out = tmp_path / "prof"
        code, _, err = run(["build", full, "--out", out, *extra, "-q"], capsys)
        assert code == 2, (extra, err)
        assert msg in err and err.startswith("emo-subset: error:") and "Traceback" not in err, (extra, err)
        assert len(err.strip().splitlines()) == 1
        no_leftovers(tmp_path, "prof")
    for model, msg in ((bad["unknown"], "unknown model_type 'llama'"),
                       (bad["missing"], "model.layers.1.mlp.experts.2.up_proj.weight"),
                       (tmp_path / "nowhere", "not a checkpoint folder")):
        out = tmp_path / "prof"
        code, _, err = run(["build", model, "--out", out, "--keep", 4, "--method", "random", "-q"], capsys)
        assert code == 2 and msg in err and "Traceback" not in err, err
        no_leftovers(tmp_path, "prof")
    code, _, err = run(["fingerprint", full, empty, "--out", tmp_path / "fp", "-q"], capsys)
    assert code == 2 and "no documents" in err and not (tmp_path / "fp.npz").exists()
    code, _, err = run(["discover", tmp_path / "nofp.npz", "-q"], capsys)
    assert code == 2 and "no such fingerprint file" in err


def test_a_failure_while_writing_leaves_nothing_behind(env, monkeypatch, tmp_path):
    import subsetting.writer as w

    root, full, corpus = env

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "load_config", boom)  # called inside the temporary folder, after the shards
    out = tmp_path / "prof"
    assert run(["build", full, "--out", out, "--keep", 4, "--method", "random", "-q"])[0] == 2
    no_leftovers(tmp_path, "prof")


# -- a real process, resolving a hub repo id from a local cache -------------------------------


def test_subprocess_build_from_a_hub_repo_id(env, tmp_path, monkeypatch, capsys):
    root, full, corpus = env
    cache = tmp_path / "hub"
    lay_out_hub_cache(full, cache, "acme/tiny-emo", "a" * 40)
    envv = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    exe = ROOT / ".venv" / "bin" / "emo-subset"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "subsetting.cli"]
    out = tmp_path / "hubprof"
    p = subprocess.run(cmd + ["build", "acme/tiny-emo", "--out", str(out), "--corpus", str(corpus), "--keep", "4",
                              "--threads", "1", "--json", "--quiet"], capture_output=True, text=True, env=envv, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["profile"] == str(out)
    assert p.stderr == ""
    assert_profile_equals_pool(full, out)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(["build", "acme/absent", "--out", tmp_path / "x", "--keep", 4, "--method", "random", "-q"], capsys)
    assert code == 2 and "acme/absent" in err and "Traceback" not in err
    no_leftovers(tmp_path, "x")


def test_corpus_reader_folders_txt_and_domains(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("hello world")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text('{"text": "x = 1", "domain": "code"}\n{"text": ""}\n')
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\xff")
    docs = read_corpus([tmp_path / "d"])
    assert [(d.text, d.domain) for d in docs] == [("hello world", None), ("x = 1", "code")]
    assert [d.text for d in read_corpus([tmp_path / "d"], domain="code")] == ["hello world", "x = 1"]


# -- calibration size, progress (issue 12, item 13) -------------------------------------------------


def test_max_docs_splits_evenly_between_domains():
    """A small domain gets as many documents as a big one (the help's promise), not a share
    proportional to its size; what a domain cannot use goes to the others."""
    from subsetting.corpus import Document, sample

    docs = [Document(f"{d} {i}", d, "x") for d, n in (("big", 100), ("mid", 10), ("tiny", 2)) for i in range(n)]
    got = sample(docs, 30)
    count = {d: sum(x.domain == d for x in got) for d in ("big", "mid", "tiny")}
    assert count == {"tiny": 2, "mid": 10, "big": 18} and len(got) == 30
    assert [x.text for x in got if x.domain == "big"][:3] == ["big 0", "big 5", "big 11"]  # evenly spaced
    even = sample([Document(str(i), d, "x") for d in "abc" for i in range(50)], 31)
    assert sorted(sum(x.domain == d for x in even) for d in "abc") == [10, 10, 11]
    with pytest.raises(Exception, match="fewer than the 3 domains"):
        sample(docs, 2)


def test_small_calibration_is_warned_about(env, capsys, tmp_path):
    root, full, corpus = env
    code, out, err = run(["fingerprint", full, corpus, "--out", tmp_path / "fp.npz", "--json"], capsys)
    assert code == 0
    for dom in ("code", "prose", "math"):
        assert f"warning: domain {dom!r} has only 4 documents" in err
    assert len(json.loads(out)["warnings"]) == 3
    code, out, err = run(["build", full, "--out", tmp_path / "p", "--corpus", corpus, "--domain", "math", "--keep", 4,
                          "--json", "-q"], capsys)
    assert code == 0 and err == ""  # --quiet: the summary still carries the warning
    assert json.loads(out)["warnings"] and "'math' has only 4 documents" in json.loads(out)["warnings"][0]


def test_eval_shows_progress_over_tokens(env, capsys, tmp_path):
    root, full, corpus = env
    out = tmp_path / "p"
    assert run(["build", full, "--out", out, "--keep", 4, "--method", "random", "-q"], capsys)[0] == 0
    code, _, err = run(["eval", out, "--base", full, "--text", corpus], capsys)
    import re

    assert code == 0 and re.search(r"eval: .*\| [\d.]+/\d+ .*tok/s", err), err  # a bar over the tokens to run


def test_write_progress_counts_bytes_as_tensors_are_written(tmp_path):
    """The write bar moves tensor by tensor (it used to move only when a shard was finished, so a
    one-shard profile showed 0 B for its whole write)."""
    from modeling.io.safetensors_io import write_checkpoint

    tensors = {f"t{i}": torch.full((64, 32), float(i)) for i in range(5)}
    seen: list[int] = []
    done = write_checkpoint(tmp_path / "ck", {"model_type": "x"}, tensors, on_write=seen.append)
    assert seen == [64 * 32 * 4] * 5 and len(done.shard_sha256) == 1
