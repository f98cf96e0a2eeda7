"""One sequence's decoding state after each sampled token, in the two halves of
vLLM v1's split, shared by the server's engine and `Model.generate`:

- `TokenState` (the engine core's half, token ids only): which ids stop the
  sequence (end of text unless `ignore_eos`, plus `stop_token_ids`, never
  before `min_tokens`, as vLLM), `max_tokens`, and the grammar of structured
  output (`SamplingParams.constraint`, accepted token by token, its completion
  a stop). It never touches text, so the engine thread never detokenizes.
- `TextState` (the output processor's half): incremental detokenization and
  stop strings, held back and cut as OpenAI does. The server runs it on the
  asyncio side per request; a stop string found there ends the sequence (the
  engine is told to drop it), and the tokens past it are never shown.

Sampling itself is `modeling.sampling.sample_next` over many rows at once; this
is what happens to one row's token."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .sampling import SamplingParams, StopChecker
from .tokenizer import IncrementalDetokenizer, Tokenizer


class TokenState:
    def __init__(self, params: SamplingParams, eos_ids: Iterable[int]):
        self.params = params
        self.output: list[int] = []  # what sampling's penalties read is what `accept` appends to
        self.generator: torch.Generator | None = params.make_generator()
        self.stop_ids: set[int] = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))

    def accept(self, tok: int) -> tuple[bool, str | None]:
        """Feed one sampled token: (whether it is part of the output, the finish
        reason when the sequence ends here)."""
        if tok in self.stop_ids and len(self.output) >= self.params.min_tokens:
            return False, "stop"
        self.output.append(tok)
        # structured output (modeling.structured.Constraint): the grammar advances over every kept token
        # (which also starts computing its next mask); complete, or refusing the token, it ends the sequence
        grammar = self.params.constraint
        if grammar is not None and (not grammar.accept(tok) or grammar.done):
            return True, "stop"
        if len(self.output) >= self.params.max_tokens:
            return True, "length"
        return True, None


class TextState:
    def __init__(self, params: SamplingParams, tokenizer: Tokenizer | None):
        self.stops = StopChecker(params.stop)
        self.detok = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer is not None
                      else None)

    def add(self, tok: int) -> tuple[str, bool]:
        """The text one kept token releases, and whether a stop string completed in
        it (the sequence ends with this token, finish reason `stop`)."""
        if self.detok is None:
            return "", False
        return self.stops.feed(self.detok.add([tok]))

    def finish(self, reason: str) -> tuple[str, str]:
        """The text still held back (a possible stop-string prefix, an incomplete
        character) and the final reason: a stop string that completes only in that
        tail turns `length` into `stop`."""
        if self.stops.stopped:
            return "", reason
        text = ""
        if self.detok is not None:
            tail = self.detok.flush()
            if tail:
                text, hit = self.stops.feed(tail)
                if hit:
                    return text, "stop"
        return text + self.stops.flush(), reason

    @property
    def text(self) -> str:
        """The output text so far, stop strings cut."""
        return self.stops.text
