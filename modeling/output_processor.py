"""The output processor (vLLM v1's third part): per sequence, off the engine
core (the server runs it on the asyncio side per request, `Model.generate`
after each step), it turns the engine core's events (token ids and
logprobs) into what the client sees: incremental detokenization, stop strings
held back and cut as OpenAI does, the finish reason, and the routing counts of
`return_routing`. The engine thread never detokenizes.

A stop string ends a sequence here, while the engine may already be running
its next step: the request cancels it (the engine drops it before the step
after), and whatever the engine sent past that token is never shown, so the
output is what it would be had the engine stopped at once."""

from __future__ import annotations

import torch

from .decoding import TextState
from .engine_core import SeqEvent
from .sampling import SamplingParams
from .tokenizer import Tokenizer


class SeqOutput:
    """What one sequence has shown so far, and the decoding of its text."""

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer | None):
        self.text = TextState(params, tokenizer)
        self.expert_counts: dict[int, torch.Tensor] = {}  # layer -> tokens per slot, of the steps shown
        self.finished = False

    def process(self, ev: SeqEvent) -> bool:
        """Fill in `ev` as the client sees it (its text; its tokens cut after a
        stop string; its finish reason) and count its routing. True when a stop
        string ended the sequence while the engine still runs it (cancel it)."""
        if self.finished:  # sent by the engine before it saw the cancellation: not part of the output
            ev.tokens.clear()
            ev.text, ev.finish_reason, ev.expert_counts = "", None, None
            return False
        for layer, c in (ev.expert_counts or {}).items():
            self.expert_counts[layer] = self.expert_counts.get(layer, 0) + c
        parts, cut = [], False
        for j, info in enumerate(ev.tokens):
            delta, hit = self.text.add(info.token_id)
            parts.append(delta)
            if hit:
                del ev.tokens[j + 1:]
                cut = ev.finish_reason is None
                ev.finish_reason = "stop"
                break
        if ev.finish_reason is not None:
            tail, ev.finish_reason = self.text.finish(ev.finish_reason)
            parts.append(tail)
            self.finished = True
        ev.text = "".join(parts)
        return cut
