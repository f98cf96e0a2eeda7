"""Issue 17: the engine split as in vLLM v1. The engine core (the engine thread)
returns token ids and logprobs only; detokenization and stop strings run in the
output processor on the asyncio side, and what a client gets is still exactly
what `Model.generate` (the synchronous driver) gives."""

from __future__ import annotations

import asyncio
import threading

from tests.test_server_adversarial import _engine_state

PROMPT = "def add(a, b):"


def _generate(state, profile: str, **params):
    from modeling import SamplingParams

    model = state.registry.model
    return model.generate(PROMPT, SamplingParams(temperature=0, ignore_eos=True, **params),
                          pool=state.registry.get(profile).resolved)


def test_engine_core_sends_token_ids_and_the_output_processor_makes_the_text(ckpt):
    """Before: the engine thread detokenized and cut stop strings (its events held
    text, and the sequence ended at the stop string). Now its events hold token
    ids only, it runs to max_tokens, and the output processor turns those events
    into `Model.generate`'s text, tokens and finish reason."""
    from modeling import SamplingParams
    from server.engine import Sequence
    from modeling.output_processor import SeqOutput

    state = _engine_state(ckpt)
    full = _generate(state, "code", max_tokens=16)
    stop = full.text[4:6]
    assert stop and full.text.index(stop) >= 2
    cut = _generate(state, "code", max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]

    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    events, done = [], threading.Event()

    def sink(ev) -> None:
        events.append(ev)
        if ev.finish_reason or ev.error:
            done.set()

    eng = state.engine
    eng.start()
    try:
        ids = state.registry.model.tokenizer.encode(PROMPT)
        eng.submit([Sequence(ids, params, "code", sink)])
        assert done.wait(60)
    finally:
        eng.stop()
    assert all(ev.error is None and ev.text == "" for ev in events)  # no text from the engine thread
    assert sum(len(ev.tokens) for ev in events) == 16 and events[-1].finish_reason == "length"

    out = SeqOutput(params, state.registry.model.tokenizer)
    shown, tokens, reason = "", [], None
    for ev in events:
        out.process(ev)
        shown += ev.text
        tokens += [t.token_id for t in ev.tokens]
        reason = ev.finish_reason or reason
    assert (shown, tokens, reason) == (cut.text, cut.token_ids, "stop")


def test_stop_string_ends_a_request_with_exact_tokens_and_routing(ckpt):
    """Through a request (`Run`, the asyncio side): a stop string found by the
    output processor cancels the engine's sequence; its text and token count are
    `Model.generate`'s, and `return_routing` counts only the tokens that ran
    before the kept ones (prompt + kept - 1, each to top_k experts), although the
    engine may have run further before it saw the cancellation."""
    from modeling import SamplingParams
    from server.entrypoints.openai.request_run import Run

    state = _engine_state(ckpt)
    full = _generate(state, "code", max_tokens=24)
    stop = full.text[6:8]
    cut = _generate(state, "code", max_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop" and 0 < len(cut.token_ids) < 24
    ids = state.registry.model.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])

    async def run() -> tuple:
        r = Run(state, None, "code", [(ids, params)], None, False, return_routing=True)
        r.submit()
        await r.collect()
        await asyncio.sleep(0.3)  # the engine drops the cancelled sequence: no event changes the result
        return r.results[0], r.routing(0)

    state.engine.start()
    try:
        res, routing = asyncio.run(run())
    finally:
        state.engine.stop()
    assert (res.text, [t.token_id for t in res.tokens], res.finish_reason) == (cut.text, cut.token_ids, "stop")
    ran = len(ids) + len(cut.token_ids) - 1
    top_k = state.registry.model.config.top_k
    assert routing["layers"] and all(sum(layer["tokens"]) == ran * top_k for layer in routing["layers"])
    assert state.engine.running == []


def test_perplexity_auto_rule_honours_auto_min_fit(ckpt):
    """Before: the engine's perplexity probe scored the profiles and chose one
    without looking at `--auto-min-fit`. Now a prompt that no profile fits well
    enough is served by `full`, as `Registry.choose_auto` decides, and a fit
    threshold every profile passes still scores by perplexity."""
    from modeling import SamplingParams
    from server.engine import Sequence

    ids = list(range(20, 60))
    for min_fit in (2.0, 1e-6):
        state = _engine_state(ckpt, auto_rule="perplexity", auto_min_fit=min_fit)
        want = state.registry.choose_auto(ids)
        assert (want == "full") == (min_fit == 2.0)
        done = threading.Event()
        seqs = [Sequence(ids, SamplingParams(max_tokens=1, temperature=0), "auto",
                         lambda ev: done.set() if ev.finish_reason or ev.error else None, return_routing=rr)
                for rr in (False, True)]
        state.engine.start()
        try:
            state.engine.submit(seqs[:1])
            assert done.wait(60)
            done.clear()
            state.engine.submit(seqs[1:])
            assert done.wait(60)
        finally:
            state.engine.stop()
        assert [s.profile for s in seqs] == [want, want]
        assert set(seqs[1].prompt_affinity) == {"code", "prose"}
