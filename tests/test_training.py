"""Tests for `training/`: a tiny training run, export equivalence with `modeling`,
and the bundled demo checkpoints (perplexity as reported, Python-looking output)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "modeling" / "bundled"
EMO_BUNDLE = BUNDLED / "emo-demo"
STD_BUNDLE = BUNDLED / "stdmoe-demo"
RESULTS = ROOT / "reports" / "training" / "results.json"


def _load_model():
    try:
        from modeling import load_model
    except ImportError as e:  # pragma: no cover - while modeling is being written
        pytest.skip(f"modeling.load_model is not available yet ({e})")
    return load_model


def _tiny_corpus(tmp_path: Path) -> tuple[Path, Path, Path]:
    from training.tokenizer import train_tokenizer, write_tokenizer

    rng = random.Random(0)
    rows = []
    for i in range(12):
        rows.append({"id": f"py{i}", "domain": "python",
                     "text": "".join(f"def f{j}(x):\n    return x + {rng.randint(0, 9)}\n\n" for j in range(30))})
        rows.append({"id": f"c{i}", "domain": "c",
                     "text": "".join(f"extern int g{j}(const char *s, size_t n);\n" for j in range(30))})
        rows.append({"id": f"p{i}", "domain": "prose",
                     "text": " ".join(rng.choice(["the", "licence", "software", "is", "free", "of", "charge"])
                                      for _ in range(300))})
        rows.append({"id": f"a{i}", "domain": "arith",
                     "text": "".join(f"{a} + {a} = {2 * a}\n" for a in range(30))})
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    tok = train_tokenizer((r["text"] for r in rows), vocab_size=300)
    write_tokenizer(tok, tmp_path / "tok")
    return corpus, held, tmp_path / "tok"


TINY_BASE = ["--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "8",
        "--intermediate", "16", "--ctx", "32", "--batch", "8", "--eval-every", "2", "--save-every", "100",
        "--no-progress", "--warmup", "1"]
TINY = ["--steps", "3", *TINY_BASE]


@pytest.mark.parametrize("variant", ["emo", "std"])
def test_tiny_training_runs(tmp_path, variant):
    from training.train import main

    corpus, held, tok = _tiny_corpus(tmp_path)
    out = tmp_path / variant
    main(["--variant", variant, "--out", str(out), "--corpus", str(corpus), "--heldout", str(held),
          "--tokenizer", str(tok), *TINY])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert "heldout_loss" in log[1] and set(log[1]["heldout_loss"]) == {"python", "c", "prose", "arith"}
    cfg = json.loads((out / "bundle" / "config.json").read_text())
    assert cfg["model_type"] == "emo" and cfg["architectures"] == ["EmoForCausalLM"]
    assert cfg["num_shared_experts"] == (1 if variant == "emo" else 0)
    assert (out / "bundle" / "tokenizer.json").is_file()


def test_emo_pool_restricts_each_document():
    """Every token of a document routes inside that document's top-N pool (plus the shared expert)."""
    from training.model import EmoTrainModel, TrainConfig

    torch.manual_seed(0)
    m = EmoTrainModel(TrainConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  head_dim=16, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                  num_shared_experts=1, max_position_embeddings=16))
    moe = m.layers[0].mlp
    x = torch.randn(20, 32)
    group = torch.tensor([0] * 12 + [1] * 8)
    pool_n = torch.tensor([3, 5])
    allowed = moe.pool_mask(moe.gate(x).float(), group, 2, pool_n)
    assert allowed[:, 7].all()  # the shared expert is always allowed
    assert int(allowed[0, :7].sum()) == 3 and int(allowed[12, :7].sum()) == 5
    assert (allowed[:12] == allowed[0]).all() and (allowed[12:] == allowed[12]).all()
    p = torch.softmax(moe.gate(x[:12]).float()[:, :7], -1).mean(0)
    assert set(torch.topk(p, 3).indices.tolist()) == set(allowed[0, :7].nonzero().flatten().tolist())
    y, aux = moe(x, group, 2, pool_n)
    assert y.shape == x.shape and torch.isfinite(aux["lb"])


@pytest.mark.parametrize("shared", [1, 0])
def test_export_matches_modeling(tmp_path, shared):
    """The exported bf16 checkpoint, loaded by `modeling.load_model`, computes what the training model does."""
    load_model = _load_model()
    from training.model import EmoTrainModel, TrainConfig
    from training.tokenizer import train_tokenizer, write_tokenizer
    from training.train import export_bundle

    tok = train_tokenizer(["def f(x):\n    return x\n" * 20], vocab_size=280)
    write_tokenizer(tok, tmp_path / "tok")
    cfg = TrainConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      head_dim=16, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                      num_shared_experts=shared, max_position_embeddings=32)
    torch.manual_seed(0)
    m = EmoTrainModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
            p.copy_(p.to(torch.bfloat16).float())  # what the bf16 bundle holds
    export_bundle(m, tmp_path / "ckpt", tmp_path / "tok")
    model = load_model(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (24,))
    m.eval()
    with torch.no_grad():
        ref, _ = m(ids[None], torch.ones(1, 24, dtype=torch.bool))
    got = model.logits(ids.tolist())
    torch.testing.assert_close(got, ref[0], atol=2e-4, rtol=2e-4)


def _bundle_or_skip(path: Path):
    if not (path / "config.json").is_file():
        pytest.skip(f"{path.relative_to(ROOT)} is not bundled yet")
    if not RESULTS.is_file():
        pytest.skip(f"{RESULTS.relative_to(ROOT)} is not written yet")


@pytest.mark.parametrize("name,path", [("emo", EMO_BUNDLE), ("std", STD_BUNDLE)])
def test_bundled_perplexity_matches_report(name, path):
    _bundle_or_skip(path)
    load_model = _load_model()
    from training.corpus import HELDOUT_PATH, load_jsonl
    from training.report import QUICK_DOCS, _tokenizer, eos_of, heldout_ppl

    res = json.loads(RESULTS.read_text())[name]
    model = load_model(path, dtype=torch.float32)
    got = heldout_ppl(model, load_jsonl(HELDOUT_PATH), _tokenizer(path), eos_of(model), max_docs=QUICK_DOCS)
    assert set(got) == set(res["quick_ppl"])
    for d, v in res["quick_ppl"].items():
        assert got[d] == pytest.approx(v, rel=0.01), d
    # sanity: the model learnt something on every domain (uniform would be the vocabulary size)
    assert all(v < model.config.vocab_size / 10 for v in res["heldout_ppl"].values())


def test_bundled_emo_is_small_and_well_formed():
    _bundle_or_skip(EMO_BUNDLE)
    cfg = json.loads((EMO_BUNDLE / "config.json").read_text())
    assert cfg["model_type"] == "emo" and cfg["num_shared_experts"] == 1 and cfg["torch_dtype"] == "bfloat16"
    for p in (EMO_BUNDLE, STD_BUNDLE):
        size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
        assert 0 < size < 50e6
        assert (p / "tokenizer.json").is_file() and (p / "tokenizer_config.json").is_file()


def test_bundled_emo_continues_python():
    _bundle_or_skip(EMO_BUNDLE)
    load_model = _load_model()
    from training.report import PY_PROMPT, _tokenizer, greedy

    model = load_model(EMO_BUNDLE, dtype=torch.float32)
    text = greedy(model, _tokenizer(EMO_BUNDLE), PY_PROMPT, n=40)
    markers = ["return", "(", ")", ":", "\n    ", "self", "def ", "=", "."]
    hits = [m for m in markers if m in text]
    assert len(hits) >= 3, f"not Python-looking: {text!r}"


def test_resume_continues_the_same_run(tmp_path):
    """A run stopped and resumed sees the same batches and pools as one run straight through."""
    from training.train import main

    corpus, held, tok = _tiny_corpus(tmp_path)
    common = ["--variant", "emo", "--corpus", str(corpus), "--heldout", str(held), "--tokenizer", str(tok),
              *TINY_BASE]
    main([*common, "--out", str(tmp_path / "a"), "--steps", "4"])
    main([*common, "--out", str(tmp_path / "b"), "--steps", "4", "--max-minutes", "1e-9"])  # stops after 1 step
    main([*common, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"])
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=2e-3)
