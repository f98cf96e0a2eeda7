"""The sampler's grammar hook (modeling.structured.Constraint through
SamplingParams.constraint) on the bundled demo model's vocabulary, without a
server: masks hold at every step, for greedy and sampled rows in one batch, and
the grammar wins over a ban that would leave no token."""

from __future__ import annotations

import re

import torch

from modeling import SamplingParams, load_model
from modeling.sampling import sample_next
from modeling.structured import GrammarCompiler

DEMO = "modeling/bundled/emo-demo"


def _compiler():
    model = load_model(DEMO)
    tok = model.tokenizer
    return model, GrammarCompiler(tok.path, model.config.vocab_size, tok.eos_token_ids)


def test_masked_batch_follows_each_rows_grammar_and_stops():
    model, comp = _compiler()
    tok = model.tokenizer
    g = comp.check(comp.regex("(ab|cd){2,4}"))
    params = [SamplingParams(max_tokens=20, temperature=t, seed=i, constraint=comp.constraint(g))
              for i, t in enumerate([0.0, 1.0, 1.5])] + [SamplingParams(max_tokens=20, temperature=1.0, seed=9)]
    outs: list[list[int]] = [[] for _ in params]
    live = list(range(len(params)))
    for _ in range(20):
        logits = torch.randn(len(params), model.config.vocab_size) * 4
        toks = sample_next(logits, params, [p.make_generator() for p in params], outs, None, None)
        for r in list(live):
            c = params[r].constraint
            if c is not None and toks[r] in tok.eos_token_ids:
                live.remove(r)
                continue
            outs[r].append(toks[r])
            if c is not None and (not c.accept(toks[r]) or c.done):
                live.remove(r)
        if live == [3]:
            break
    for r in range(3):
        assert re.fullmatch("(ab|cd){2,4}", tok.decode(outs[r])), tok.decode(outs[r])
        assert params[r].constraint.failed is None
    assert len(outs[3]) > 0  # the unconstrained row of the batch sampled freely


def test_grammar_wins_over_a_ban_that_leaves_nothing():
    model, comp = _compiler()
    eos = model.tokenizer.eos_token_ids[0]
    c = comp.constraint(comp.check(comp.regex("x")))
    x = model.tokenizer.encode("x")
    assert len(x) == 1 and c.accept(x[0])
    # only the end is allowed now, and min_tokens bans it: the row still gets the end, never a forbidden token
    p = SamplingParams(max_tokens=5, temperature=1.0, min_tokens=3, constraint=c)
    tok = sample_next(torch.randn(1, model.config.vocab_size), [p], [None], [[x[0]]], None, [{eos}])[0]
    assert tok == eos


def test_generate_follows_the_grammar_through_the_token_state():
    """`Model.generate` and the engine share `TokenState`, which accepts every
    kept token into the grammar and stops the sequence once it is complete."""
    model, comp = _compiler()
    g = comp.check(comp.regex("(ab|cd){2,3}"))
    for seed, temp in [(0, 0.0), (1, 1.0), (2, 1.5)]:
        c = comp.constraint(g)
        out = model.generate("x = ", SamplingParams(max_tokens=30, temperature=temp, seed=seed, constraint=c))
        assert re.fullmatch("(ab|cd){2,3}", out.text), out.text
        assert out.finish_reason == "stop" and c.done and c.failed is None
