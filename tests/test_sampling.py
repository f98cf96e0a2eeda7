"""Sampling (issue 12 items 1 and 10): no parameter value the API accepts makes
`sample_next` raise; the batched sampler keeps seeded rows reproducible whatever
else is in the batch; penalties, logit bias and min_tokens do what OpenAI and
vLLM define; incremental detokenization equals a whole decode; the default
thread count follows affinity and the cgroup CPU quota."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling import SamplingParams
from modeling.sampling import process_logits, sample_next, seed_for_choice
from modeling.threads import CPUBudget, cgroup_cpu_quota
from modeling.tokenizer import IncrementalDetokenizer, Tokenizer

BUNDLED = Path(__file__).resolve().parents[1] / "modeling" / "bundled" / "emo-demo"

TINY = [1e-5, 1e-6, 1e-38, 1e-45, 5e-324, 1e-300]


@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperature_is_greedy_not_an_error(temperature):
    logits = torch.randn(3, 500) * 30
    params = [SamplingParams(temperature=temperature), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=temperature, seed=5, top_p=0.9, top_k=7)]
    out = sample_next(logits, params, [p.make_generator() for p in params])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())


@pytest.mark.parametrize("top_p", [1e-45, 5e-324, 1e-300, 1e-8])
def test_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.randn(4, 300) * 5
    params = [SamplingParams(temperature=1.5, top_p=top_p, seed=i) for i in range(4)]
    out = sample_next(logits, params, [p.make_generator() for p in params])
    assert out == logits.argmax(-1).tolist()


def test_extreme_logits_never_raise():
    logits = torch.tensor([[3e38, -3e38, 0.0, 1.0], [float("-inf"), 0.0, float("-inf"), 1.0],
                           [float("nan"), 1.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=2.0, top_p=0.5, top_k=3, seed=1)] * 3
    out = sample_next(logits, params, [p.make_generator() for p in params])
    assert out[0] == 0 and out[1] in (1, 3) and len(out) == 3


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = [sample_next(logits[:1], [p], [p.make_generator()])[0] for _ in range(2)]
    others = [SamplingParams(temperature=t, seed=s) for t, s in ((0.5, None), (0, None), (1.3, 9), (1.0, None),
                                                                   (0.8, 3))]
    gens = [p.make_generator()] + [q.make_generator() for q in others]
    mixed = sample_next(logits, [p, *others], gens)
    assert alone[0] == alone[1] == mixed[0]
    assert mixed[2] == int(logits[2].argmax())  # the greedy row


def test_sampling_follows_the_distribution():
    """The exponential race draws each token with its softmax probability
    (top-k and top-p applied): 20000 draws, each share within 0.015."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    B = 20000
    p = SamplingParams(temperature=1.0)
    out = torch.tensor(sample_next(logits.expand(B, 4), [p] * B, [None] * B))
    share = torch.bincount(out, minlength=4).float() / B
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015), share
    # top_p 0.75: 0.5 + 0.3 reach it, the rest is dropped and the two renormalised
    q = SamplingParams(temperature=1.0, top_p=0.75)
    out = torch.tensor(sample_next(logits.expand(B, 4), [q] * B, [None] * B))
    share = torch.bincount(out, minlength=4).float() / B
    assert share[2:].sum() == 0 and abs(float(share[0]) - 0.625) < 0.015


def test_penalties_bias_and_min_tokens():
    V = 10
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = [[0, 0, 3]]
    got = process_logits(logits, [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], out)
    want = logits.clone()
    want[0, 0] -= 0.5 * 2 + 0.25
    want[0, 3] -= 0.5 * 1 + 0.25
    assert torch.equal(got, want)
    # vLLM's repetition penalty: over prompt and output, positive logits divided, negative multiplied
    got = process_logits(logits, [SamplingParams(repetition_penalty=2.0)], [[0]], prompts=[[1]])
    want = logits.clone()
    want[0, 0], want[0, 1] = 1.0, -2.0
    assert torch.equal(got, want)
    got = process_logits(logits, [SamplingParams(logit_bias={4: 100.0, 0: -100.0})], [[]])
    assert got[0, 4] == 100.0 and got[0, 0] == -98.0
    # min_tokens: stop ids banned until that many tokens exist
    p = SamplingParams(temperature=0, min_tokens=2)
    assert sample_next(logits, [p], [None], [[5]], stop_ids=[{0}]) == [3]
    assert sample_next(logits, [p], [None], [[5, 6]], stop_ids=[{0}]) == [0]
    assert V == logits.shape[1]


def test_seed_for_choice_wraps_into_the_generator_range():
    assert seed_for_choice(7, 2) == 9
    top = 2 ** 64 - 1
    s = seed_for_choice(top, 1)
    SamplingParams(seed=s).make_generator()
    assert s == -(2 ** 63)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2 ** 64)


def test_incremental_detokenizer_equals_whole_decode():
    tok = Tokenizer(BUNDLED)
    gen = torch.Generator().manual_seed(0)
    texts = ["héllo wörld: ünïcode 日本語 🙂 and ∑ x² dx\n", "def f(x):\n    return x  # é"]
    cases = [tok.encode(t) for t in texts]
    cases += [torch.randint(0, tok.vocab_size, (int(n),), generator=gen).tolist()
              for n in torch.randint(1, 60, (40,), generator=gen)]
    for ids in cases:
        d = IncrementalDetokenizer(tok)
        pieces = [d.add([t]) for t in ids]
        assert "".join(pieces) + d.flush() == tok.decode(ids)


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_cpu_quota_v2_and_v1(tmp_path):
    # cgroup v2: the tightest cpu.max of the process's group and its parents
    root = tmp_path / "v2"
    _write(root / "kubepods" / "pod1" / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "cg2", "0::/kubepods/pod1\n")
    assert cgroup_cpu_quota(root, tmp_path / "cg2") == 1.5
    assert CPUBudget(8, 1.5).threads == 1 and CPUBudget(2, None).threads == 2 and CPUBudget(4, 0.2).threads == 1
    # cgroup v1: cfs_quota_us / cfs_period_us; -1 means none
    root = tmp_path / "v1"
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "cg1", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert cgroup_cpu_quota(root, tmp_path / "cg1") == 2.0
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(root, tmp_path / "cg1") is None
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None
