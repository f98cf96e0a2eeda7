"""Sampling and stopping: greedy, temperature, top-k, top-p, seeds, penalties,
logit bias, minimum length, stop strings and ids.

`sample_next` works on a batch of logits with per-row parameters, so the
server's engine and the simple `generate` loop share one implementation. It is
vectorized over rows; only a seeded row draws its noise from its own generator
(so a seeded sequence gives the same tokens whatever else is in the batch).

Robustness is part of the contract: any parameters `SamplingParams` accepts
give a token, never an exception (a tiny temperature is greedy, a tiny top_p
keeps the most likely token), because one request's parameters must never fail
the other sequences of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Below this temperature sampling is greedy (as vLLM does): dividing by it would
# overflow float32 and the distribution is one token anyway.
SAMPLING_EPS = 1e-5
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


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
    min_tokens: int = 0  # stop tokens (eos, stop_token_ids) are banned until this many were generated
    presence_penalty: float = 0.0  # OpenAI: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    repetition_penalty: float = 1.0  # vLLM/CTRL: logits of prompt and output tokens divided (>0) or multiplied (<0)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    skip_special_tokens: bool = True  # vLLM's: special tokens left out of the text (harmony's markers are kept)
    # grammar-constrained decoding (modeling.structured.Constraint): one per sequence, it masks the
    # tokens its grammar forbids; whoever appends the sampled token calls its `accept`
    constraint: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        def finite(name: str) -> float:
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number")
            return v

        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if finite("temperature") < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < finite("top_p") <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 or positive")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        if finite("repetition_penalty") <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(not math.isfinite(float(v)) for v in self.logit_bias.values()):
            raise ValueError("logit_bias values must be finite numbers")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def make_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator()
        g.manual_seed(int(self.seed))
        return g


def seed_for_choice(seed: int, i: int) -> int:
    """The seed of choice `i` of a request seeded with `seed`: seed + i, wrapped
    into the range a generator takes (so no seed the API accepts overflows)."""
    lo, hi = SEED_RANGE
    return lo + (seed + i - lo) % (hi - lo + 1)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Rows of `logits` `[B, V]` with everything outside each row's top-k and
    nucleus (top-p) set to -inf. `top_k` `[B]` long (V: off), `top_p` `[B]` float
    (1: off). The most likely token always stays, whatever top_p is."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    V = logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(V, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None].to(probs.dtype)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of float32 logits."""
    logits = logits / max(temperature, SAMPLING_EPS)
    V = logits.numel()
    k = torch.tensor([top_k if 0 < top_k < V else V])
    return apply_top_k_top_p(logits[None], k, torch.tensor([float(top_p)]))[0]


def _apply_penalties(logits: Tensor, rows: list[int], params: list[SamplingParams], outputs: list[list[int]],
                     prompts: list[list[int]] | None) -> None:
    """In place, on `rows` of `logits`: OpenAI's presence and frequency penalties
    over the generated tokens, vLLM's repetition penalty over prompt and output."""
    V = logits.shape[-1]
    for r in rows:  # per penalized row; each is a few vectorized ops over V
        p = params[r]
        out = torch.tensor(outputs[r], dtype=torch.long)
        row = logits[r]
        if p.repetition_penalty != 1:
            seen = torch.zeros(V, dtype=torch.bool)
            seen[out] = True
            if prompts is not None:
                seen[torch.tensor(prompts[r], dtype=torch.long)] = True
            pen = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, pen, row))
        if (p.frequency_penalty or p.presence_penalty) and out.numel():
            counts = torch.bincount(out, minlength=V)[:V].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def process_logits(logits: Tensor, params: list[SamplingParams], outputs: list[list[int]] | None = None,
                   prompts: list[list[int]] | None = None, stop_ids: list[set[int]] | None = None) -> Tensor:
    """Logit bias, minimum length (stop tokens banned) and penalties; a new tensor."""
    logits = logits.float().clone()
    V = logits.shape[-1]
    cons = [r for r, p in enumerate(params) if p.constraint is not None]
    raw = logits[cons] if cons else None  # (a copy) the rows before bias and bans
    for r, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if 0 <= t < V], dtype=torch.long)
            vals = torch.tensor([float(v) for t, v in p.logit_bias.items() if 0 <= t < V])
            logits[r].index_add_(0, ids, vals)
        if p.min_tokens and stop_ids is not None and outputs is not None and len(outputs[r]) < p.min_tokens:
            banned = [t for t in stop_ids[r] if 0 <= t < V]
            if banned and len(banned) < V:  # every id a stop id: nothing to ban (the engine skips the check)
                logits[r, banned] = float("-inf")
    pen = [r for r, p in enumerate(params) if p.penalized]
    if pen and outputs is not None:
        _apply_penalties(logits, pen, params, outputs, prompts)
    if raw is not None:  # grammar masks, all constrained rows at once (a per-row op costs more than the mask)
        allowed = torch.zeros(len(cons), V, dtype=torch.bool)
        for j, r in enumerate(cons):
            a = params[r].constraint.allowed()[:V]
            allowed[j, :a.numel()] = a
        rows = logits[cons]
        # bias or min_tokens removed every token the grammar allows (say its end): the grammar wins
        lost = ~(torch.isfinite(rows) & allowed).any(-1)
        rows = torch.where(lost[:, None], raw, rows).masked_fill_(~allowed, float("-inf"))
        logits[cons] = rows
    return logits


def sample_next(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
                stop_ids: list[set[int]] | None = None) -> list[int]:
    """One next token per row of `logits` `[B, V]`.

    `outputs` (tokens generated so far per row), `prompts` and `stop_ids` feed
    the penalties and `min_tokens`. Sampling uses the exponential-race form of
    a categorical draw (argmax of p / q with q ~ Exp(1)): the same distribution
    as `multinomial`, and every row's noise is one vector op (a seeded row from
    its own generator)."""
    logits = process_logits(logits.cpu(), params, outputs, prompts, stop_ids)
    B, V = logits.shape
    out = logits.argmax(-1)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if not sampled:
        return out.tolist()
    idx = torch.tensor(sampled, dtype=torch.long)
    temps = torch.tensor([params[r].temperature for r in sampled], dtype=torch.float32)
    x = logits[idx] / temps[:, None]
    ks = [params[r].top_k for r in sampled]
    ps = [params[r].top_p for r in sampled]
    want_k = any(0 < k < V for k in ks)
    want_p = any(p < 1 for p in ps)
    if want_k or want_p:
        x = apply_top_k_top_p(x, torch.tensor([k if 0 < k < V else V for k in ks]) if want_k else None,
                              torch.tensor(ps, dtype=torch.float64) if want_p else None)
    probs = torch.softmax(x, -1)
    q = torch.empty_like(probs)
    unseeded = [j for j, r in enumerate(sampled) if generators[r] is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), V).exponential_()
    for j, r in enumerate(sampled):
        if generators[r] is not None:
            q[j].exponential_(generator=generators[r])
    picked = (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(-1)
    # a row whose distribution is not a distribution (non-finite logits from the
    # model) falls back to its greedy token instead of an arbitrary one
    ok = torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)
    out[idx] = torch.where(ok, picked, out[idx])
    return out.tolist()


def logprobs_of(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


class StopChecker:
    """Tracks one sequence's output text and finds stop strings across token boundaries.

    `update` returns the text that may be released (a possible prefix of a stop
    string is held back) and whether a stop was hit; the output is truncated
    before the stop string, as OpenAI does. `feed` does the same from the new
    text alone (what an incremental detokenizer gives).
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.text = ""
        self.seen = ""
        self.released = 0
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        return self.update(self.seen + delta)

    def update(self, full_text: str) -> tuple[str, bool]:
        self.text = self.seen = full_text
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
