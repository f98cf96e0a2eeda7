"""Sampling and stopping: greedy, temperature, top-k, top-p, seeds, stop strings and ids.

`sample_next` works on a batch of logits with per-row parameters, so the
server's engine and the simple `generate` loop share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 or positive")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(self.seed))
        return g


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of float32 logits."""
    logits = logits / temperature
    if top_k and top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (cum - torch.softmax(sorted_logits, -1)) >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row of `logits` `[B, V]` (float32, on CPU)."""
    logits = logits.float().cpu()
    out = []
    for row, p, g in zip(logits, params, generators):
        if p.greedy:
            out.append(int(torch.argmax(row)))
            continue
        probs = torch.softmax(filter_logits(row, p.temperature, p.top_k, p.top_p), -1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def logprobs_of(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


class StopChecker:
    """Tracks one sequence's output text and finds stop strings across token boundaries.

    `update` returns the text that may be released (a possible prefix of a stop
    string is held back) and whether a stop was hit; the output is truncated
    before the stop string, as OpenAI does.
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.text = ""
        self.released = 0
        self.stopped = False

    def update(self, full_text: str) -> tuple[str, bool]:
        self.text = full_text
        if self.stop:
            hits = [(full_text.find(s, max(0, self.released - len(s))), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                self.text = full_text[:cut]
                self.stopped = True
                delta = self.text[self.released:]
                self.released = len(self.text)
                return delta, True
            hold = max((self._partial(full_text, s) for s in self.stop), default=0)
        else:
            hold = 0
        # Never release half of a multi-byte character (shown as U+FFFD while incomplete).
        end = len(full_text) - hold
        while end > self.released and full_text[end - 1] == "\ufffd":
            end -= 1
        delta = full_text[self.released:end]
        self.released = end
        return delta, False

    def flush(self) -> str:
        """What is left to release once generation ends without a stop."""
        delta = self.text[self.released:]
        self.released = len(self.text)
        return delta

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0
