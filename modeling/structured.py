"""Grammar-constrained decoding: a per-sequence `Constraint` that masks the
tokens its grammar does not allow, through llguidance.

Why llguidance (not xgrammar): it depends on nothing (xgrammar 0.2.8 pulls
`transformers` and `triton` in at run time), it reads the `tokenizers`
`tokenizer.json` we already have (no transformers tokenizer object needed),
its JSON-schema compiler covers the schemas OpenAI's structured outputs accept
and reports the part it refuses, it compiles grammars lazily (no per-schema
precompilation pause before the first token) and it computes a mask with the
GIL dropped, so the mask of step t+1 is computed on a worker thread while the
forward pass of step t+1 runs.

Contract with the sampler (`modeling.sampling`): `SamplingParams.constraint`
holds one `Constraint` per sequence; before sampling, `process_logits` sets the
logits of the tokens outside `allowed()` to -inf; after the token is chosen the
owner (the server's engine) calls `accept(token)`, which also starts computing
the next mask in the background. `done` turns true once the grammar is
complete (only then is the end-of-sequence token allowed, and the sequence
should stop).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import llguidance
from llguidance import LLMatcher, LLTokenizer


class GrammarError(ValueError):
    """A grammar (JSON schema, regex, Lark) the library refuses; the message names the failing part."""


# masks are computed off the engine thread, while the forward pass runs (the Rust side drops the GIL); one
# worker: a mask costs well under a millisecond, and the forward's own threads should keep the cores
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="emo-grammar")
_BITS = torch.arange(32, dtype=torch.int32)


class GrammarCompiler:
    """The tokenizer as llguidance sees it (built once per model, lazily: a
    vocabulary trie) and grammar validation against it."""

    def __init__(self, tokenizer_json: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self._path = str(tokenizer_json)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tok: LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tok is None:
                try:
                    self._tok = LLTokenizer(Path(self._path).read_text(encoding="utf-8"), n_vocab=self.vocab_size,
                                            eos_token=self.eos_token_ids or None)
                except Exception as e:  # a tokenizer the library cannot read: no grammar can run on it
                    raise GrammarError(f"structured output is not available for this model's tokenizer "
                                       f"({type(e).__name__}: {_short(str(e))})") from None
            return self._tok

    # -- grammars (llguidance's own format: a JSON-wrapped set of Lark / JSON-schema / regex grammars) --
    @staticmethod
    def json_schema(schema: dict[str, Any] | bool) -> str:
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object (or true)")
        try:
            # compact separators: what the client gets is plain JSON either way, and fewer tokens are spent
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise GrammarError(f"JSON schema: {e}") from None

    @staticmethod
    def regex(pattern: str) -> str:
        return LLMatcher.grammar_from_regex(pattern)

    @staticmethod
    def lark(text: str) -> str:
        return LLMatcher.grammar_from_lark(text)

    def check(self, grammar: str) -> str:
        """`grammar` when llguidance accepts it; otherwise GrammarError with its message."""
        err = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err:
            raise GrammarError(_short(err))
        return grammar

    def constraint(self, grammar: str) -> "Constraint":
        return Constraint(self, grammar)


def _short(err: str) -> str:
    return " ".join(err.split())[:500]


class Constraint:
    """One sequence's grammar state: the mask of allowed next tokens and the
    tokens accepted so far. Not shared between sequences (n > 1: one each)."""

    def __init__(self, compiler: GrammarCompiler, grammar: str):
        self.vocab_size = compiler.vocab_size
        self.matcher = LLMatcher(compiler.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_short(self.matcher.get_error()))
        self.words = (self.vocab_size + 31) // 32
        self._next: concurrent.futures.Future | None = None
        self.failed: str | None = None  # why the grammar could not go on (a token it refused)
        # read only between masks: the matcher must not be touched while a worker computes one
        self._stopped = self.matcher.is_stopped()
        self.mask_seconds = 0.0  # time spent computing masks (on a worker), for benchmarks/bench_structured.py
        self.wait_seconds = 0.0  # time the sampler waited for a mask (what the overlap with the forward missed)
        self._start_mask()

    @property
    def done(self) -> bool:
        """The grammar is complete (or broken): the sequence must stop."""
        return self.failed is not None or self._stopped

    def _compute(self) -> Tensor:
        t0 = time.perf_counter()
        bits = torch.zeros(self.words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), self.words * 4)
        self.mask_seconds += time.perf_counter() - t0
        return bits

    def _start_mask(self) -> None:
        self._next = _POOL.submit(self._compute)

    def allowed(self) -> Tensor:
        """`[vocab]` bool: the tokens the grammar allows next (waits for the
        mask started by the last `accept`)."""
        t0 = time.perf_counter()
        bits = self._next.result() if self._next is not None else self._compute()
        self.wait_seconds += time.perf_counter() - t0
        return ((bits[:, None] >> _BITS) & 1).bool().flatten()[: self.vocab_size]

    def accept(self, token_id: int) -> bool:
        """Advance over the sampled token and start the next mask; False (and
        `done`) when the grammar refuses it."""
        if self._next is not None:
            self._next.result()  # the matcher must not move while a mask is being computed
        ok = self.matcher.consume_token(int(token_id))
        if not ok:
            self.failed = _short(self.matcher.get_error() or f"token {token_id} not allowed")
            self._next = None
            return False
        self._stopped = self.matcher.is_stopped()
        self._next = None if self._stopped else _POOL.submit(self._compute)
        return True


def library_version() -> str:
    return llguidance.__version__
