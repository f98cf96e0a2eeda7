"""The engine core (vLLM v1's `EngineCore`): a continuous-batching step over
sequences that hold token ids only, shared by the server's engine thread
(`server.engine.Engine`, which adds the queue, admission, profile pools and the
side work) and `Model.generate` (a synchronous driver of one sequence, as
vLLM's `LLM` drives its engine).

Every step has three parts:

- `_schedule`: drop sequences that were cancelled or ran past their deadline,
  admit new ones (`_admit`, the driver's) and lay out ONE packed batch: the
  new prompts and the one new token of every running sequence, prefill and
  decode together, each sequence with its own pool (profile) and its own slot
  of one shared `KVCache`;
- `_execute`: the forward pass over that batch;
- `_process_outputs`: sample (vectorized over rows), logprobs, the token-level
  stops (`TokenState`: stop ids, `min_tokens`, `max_tokens`, a complete
  grammar) and one `SeqEvent` per sequence: token ids and logprobs, never
  text. Text is the output processor's (`modeling.output_processor`).

A failure is contained to the sequence that caused it: a sequence that cannot
be set up, run or processed is failed alone (the others of the batch go on),
and a batch whose forward raises is retried one sequence at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .decoding import TokenState
from .transformer import Batch, ResolvedPool
from .sampling import SamplingParams, sample_next

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger("emo_serve.engine")


@dataclass
class TokenInfo:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None  # (token id, logprob), best first


@dataclass
class SeqEvent:
    text: str = ""  # filled by the output processor: released text delta (stop strings held back)
    tokens: list[TokenInfo] = field(default_factory=list)  # new generated tokens (logprobs when asked)
    prompt_logprobs: list[TokenInfo] | None = None  # once, before the first token, when asked
    profile: str | None = None  # the profile that serves the sequence (sent first)
    finish_reason: str | None = None  # "stop" / "length" on the last event
    error: tuple[int, str, str] | None = None  # (http status, type, message) on failure
    # with return_routing: per MoE layer, tokens of this step's forward routed to each slot
    expert_counts: dict[int, torch.Tensor] | None = None


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    profile: str  # the name of its pool, sent in its first event (the server: a hosted profile, "full", "auto")
    sink: Callable[[SeqEvent], None]  # called with each of its events, on the engine's thread
    logprobs: int | None = None  # top-n logprobs of generated tokens (None: none)
    prompt_logprobs: bool = False
    deadline: float | None = None  # time.monotonic()
    return_routing: bool = False  # count the experts its tokens used per layer (`SeqEvent.expert_counts`)
    # -- engine state --
    cancelled: bool = False
    pool: ResolvedPool | None = None
    slot: int = -1
    output: list[int] = field(default_factory=list)
    decode: TokenState | None = None  # stop ids, min/max tokens, grammar (set up on admission)
    prefilled: bool = False
    # with return_routing: layer -> [slots] tokens of the step in flight routed there (sent with its event,
    # so the output processor counts exactly the steps whose tokens it keeps)
    step_counts: dict[int, torch.Tensor] = field(default_factory=dict)

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine between steps


@dataclass
class StepPlan:
    """What `_schedule` laid out for one forward pass."""

    seqs: list[Sequence]
    tokens: list[int]
    starts: list[int]
    counts: list[int]
    rows: list[int]  # packed token rows whose logits are needed
    spans: list[tuple[int, int]]  # per sequence: (first of its rows in the logits, how many)

    def batch(self, only: list[int] | None = None) -> Batch:
        idx = range(len(self.seqs)) if only is None else only
        offs = [0]
        for n in self.counts:
            offs.append(offs[-1] + n)
        toks = [t for i in idx for t in self.tokens[offs[i]:offs[i] + self.counts[i]]]
        return Batch(torch.tensor(toks, dtype=torch.long), [self.seqs[i].slot for i in idx],
                     [self.starts[i] for i in idx], [self.counts[i] for i in idx], [self.seqs[i].pool for i in idx])


class EngineCore:
    """Sequences in cache slots and the step over them. A driver adds sequences
    (`add`, or its own `_admit` each step) and calls `step`; the hooks
    `_admit`, `_refresh_pools`, `_on_running`, `_on_prompt_tokens` and
    `_on_layer_load` are where the server's engine adds its queue and metrics."""

    def __init__(self, model: Model, max_batch: int, max_model_len: int, max_prefill_tokens: int = 2048,
                 count_all_routes: bool = False):
        self.model = model
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = model.new_cache(max_batch, max_model_len)
        self.free_slots = list(range(max_batch))[::-1]
        self.running: list[Sequence] = []
        self.count_all_routes = count_all_routes  # the routes of every step (the expert-load counters)
        self.steps = 0
        self.eos_ids = model.eos_ids

    def add(self, s: Sequence) -> None:
        """Put `s` in a free cache slot; its prefill runs in the next step."""
        if not self.free_slots:
            raise RuntimeError(f"every one of the {self.max_batch} cache slots is taken")
        s.slot = self.free_slots.pop()
        self.running.append(s)
        self._setup(s)

    # -- hooks of a driver -------------------------------------------------------------
    def _admit(self, budget: int) -> list[Sequence]:
        """Sequences to start this step, up to `budget` prompt tokens."""
        return []

    def _refresh_pools(self) -> None:
        """Each running sequence's pool as it is now (a driver whose pools change)."""

    def _on_running(self) -> None:
        """The set of running sequences changed."""

    def _on_prompt_tokens(self, n: int) -> None:
        """`n` prompt tokens were prefilled this step."""

    def _on_layer_load(self, layer: int, load: torch.Tensor) -> None:
        """Tokens this step routed to each expert slot of MoE layer `layer`."""

    def _emit(self, s: Sequence, ev: SeqEvent) -> None:
        try:
            s.sink(ev)
        except Exception:  # the request's event loop is gone: nobody is listening
            s.cancelled = True

    def _release(self, s: Sequence) -> None:
        if s in self.running:
            self.running.remove(s)
        if s.slot >= 0:
            self.cache.lengths[s.slot] = 0
            self.free_slots.append(s.slot)
            s.slot = -1
        self._on_running()

    def _fail(self, s: Sequence, status: int, etype: str, msg: str) -> None:
        self._release(s)
        self._emit(s, SeqEvent(error=(status, etype, msg)))

    def _expired(self, s: Sequence, now: float) -> bool:
        if s.cancelled:
            return True
        if s.deadline is not None and now > s.deadline:
            self._emit(s, SeqEvent(error=(504, "timeout", "the request ran past its time limit")))
            return True
        return False

    def _setup(self, s: Sequence) -> None:
        s.decode = TokenState(s.params, self.eos_ids)
        s.output = s.decode.output  # one list: what sampling's penalties read is what the state appends to
        self.cache.lengths[s.slot] = 0
        self._emit(s, SeqEvent(profile=s.profile))

    def step(self, prefill_budget: int | None = None) -> None:
        """One step: schedule, execute, process outputs (events go to the sequences' sinks)."""
        plan = self._schedule(self.max_prefill_tokens if prefill_budget is None else prefill_budget)
        if plan is None:
            return
        logits = self._execute(plan)
        self.steps += 1
        self._process_outputs(plan, logits)

    # -- schedule ------------------------------------------------------------------------
    def _schedule(self, prefill_budget: int) -> StepPlan | None:
        now = time.monotonic()
        for s in [s for s in self.running if self._expired(s, now)]:
            self._release(s)
        self._admit(prefill_budget)
        self._refresh_pools()
        self._on_running()
        seqs = list(self.running)
        if not seqs:
            return None
        plan = StepPlan(seqs, [], [], [], [], [])
        off = 0
        for s in seqs:
            if not s.prefilled:
                ids, start = s.prompt_ids, 0
            else:
                ids, start = [s.output[-1]], self.cache.lengths[s.slot]
            plan.tokens += ids
            plan.starts.append(start)
            plan.counts.append(len(ids))
            if not s.prefilled and s.prompt_logprobs:
                plan.spans.append((len(plan.rows), len(ids)))
                plan.rows += range(off, off + len(ids))
            else:
                plan.spans.append((len(plan.rows), 1))
                plan.rows.append(off + len(ids) - 1)
            off += len(ids)
        return plan

    # -- execute -------------------------------------------------------------------------
    def _execute(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Logits rows per sequence index. When the packed forward raises, each
        sequence runs alone (a forward writes its cache positions again, so a
        retry is safe) and only those that fail alone are failed."""
        want_routes = self.count_all_routes or any(s.return_routing for s in plan.seqs)
        try:
            fwd = self.model.forward(plan.batch(), self.cache, logits_at=torch.tensor(plan.rows, dtype=torch.long),
                                     collect_routes=want_routes)
            if want_routes:
                self._count_experts(plan.seqs, plan.counts, fwd.routes)
            logits = fwd.logits.float().cpu()
            return {i: logits[a:a + n] for i, (a, n) in enumerate(plan.spans)}
        except Exception:
            if len(plan.seqs) == 1:
                raise
            log.exception("batched forward failed; running its %d sequences one by one", len(plan.seqs))
        out: dict[int, torch.Tensor] = {}
        offs = [0]
        for n in plan.counts:
            offs.append(offs[-1] + n)
        for i, s in enumerate(plan.seqs):
            a, n = plan.spans[i]
            local = torch.tensor([r - offs[i] for r in plan.rows[a:a + n]], dtype=torch.long)
            try:
                fwd = self.model.forward(plan.batch([i]), self.cache, logits_at=local, collect_routes=want_routes)
                if want_routes:
                    self._count_experts([s], [plan.counts[i]], fwd.routes)
                out[i] = fwd.logits.float().cpu()
            except Exception as e:
                log.exception("forward of one sequence failed")
                self._fail(s, 500, "server_error", f"internal error in the engine: {type(e).__name__}")
        return out

    # -- process outputs -------------------------------------------------------------------
    def _sample(self, plan: StepPlan, rows: dict[int, torch.Tensor], idx: list[int]) -> dict[int, int]:
        """Next token of each sequence in `idx`, all rows at once; should that ever
        raise, row by row so that only the offending sequence fails."""
        def run(ix: list[int]) -> list[int]:
            seqs = [plan.seqs[i] for i in ix]
            return sample_next(torch.stack([rows[i][-1] for i in ix]), [s.params for s in seqs],
                               [s.decode.generator for s in seqs], [s.output for s in seqs],
                               [s.prompt_ids for s in seqs], [s.decode.stop_ids for s in seqs])
        if not idx:
            return {}
        try:
            return dict(zip(idx, run(idx)))
        except Exception:
            log.exception("sampling a batch failed; sampling its rows one by one")
        out = {}
        for i in idx:
            try:
                out[i] = run([i])[0]
            except Exception as e:
                self._fail(plan.seqs[i], 500, "server_error", f"internal error in sampling: {type(e).__name__}")
        return out

    def _process_outputs(self, plan: StepPlan, rows: dict[int, torch.Tensor]) -> None:
        live = self._finite(plan, [i for i in rows if plan.seqs[i].slot >= 0], rows)
        picked = self._sample(plan, rows, [i for i in live if plan.seqs[i].params.max_tokens > len(plan.seqs[i].output)])
        # logprobs of the generated tokens, one log_softmax and one top-k for every row that asked
        want = [i for i in picked if plan.seqs[i].logprobs is not None]
        lps: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        if want:
            lp = torch.log_softmax(torch.stack([rows[i][-1] for i in want]), -1)
            k = max(plan.seqs[i].logprobs or 0 for i in want)
            chosen = lp.gather(1, torch.tensor([[picked[i]] for i in want])).squeeze(1).tolist()
            tv, ti = torch.topk(lp, k, dim=-1) if k > 0 else (None, None)
            for j, i in enumerate(want):
                n = plan.seqs[i].logprobs or 0
                top = list(zip(ti[j, :n].tolist(), tv[j, :n].tolist())) if n > 0 else None
                lps[i] = (chosen[j], top)
        n_new_prompt = 0
        for i in live:
            s = plan.seqs[i]
            if not s.prefilled:
                n_new_prompt += len(s.prompt_ids)
            try:
                self._process_one(s, rows[i], picked.get(i), lps.get(i))
            except Exception as e:
                log.exception("processing a sequence's output failed")
                if s.slot >= 0:
                    self._fail(s, 500, "server_error", f"internal error in the engine: {type(e).__name__}")
        if n_new_prompt:
            self._on_prompt_tokens(n_new_prompt)

    def _finite(self, plan: StepPlan, live: list[int], rows: dict[int, torch.Tensor]) -> list[int]:
        """The sequences of `live` whose logits are all finite. A NaN or an infinity
        is never sampled (NaN logits used to come out as token 0, end of text: an
        empty 200): the sequence fails with `numerical_error`, naming its profile,
        whose bytes are the likely cause (a corrupted expert)."""
        if not live:
            return live
        ok = torch.stack([torch.isfinite(rows[i]).all() for i in live]).tolist()
        for i, good in zip(live, ok):
            if not good:
                s = plan.seqs[i]
                log.error("non-finite logits in a sequence served by profile %r: its weights may be corrupt", s.profile)
                self._fail(s, 500, "numerical_error", f"the model produced non-finite logits (NaN or infinity) for "
                           f"this sequence under profile {s.profile!r}; its weights may be corrupt")
        return [i for i, good in zip(live, ok) if good]

    def _process_one(self, s: Sequence, rows: torch.Tensor, tok: int | None,
                     lp: tuple[float, list[tuple[int, float]] | None] | None) -> None:
        ev = SeqEvent()
        if s.step_counts:
            ev.expert_counts, s.step_counts = s.step_counts, {}
        if not s.prefilled:
            if s.prompt_logprobs:
                ev.prompt_logprobs = self._prompt_logprobs(s, rows)
            s.prefilled = True
        if tok is None:  # max_tokens reached (max_tokens 0: prompt only)
            self._finish(s, ev, "length")
            return
        info = TokenInfo(tok, None, None)
        if lp is not None:
            info.logprob, info.top = lp
        kept, reason = s.decode.accept(tok)
        if kept:
            ev.tokens.append(info)
        if reason is None and self.cache.lengths[s.slot] >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(s, ev, reason)
            return
        self._emit(s, ev)

    def _count_experts(self, seqs: list[Sequence], counts: list[int], routes) -> None:
        """Expert load of this step: per layer, tokens routed to each expert (all
        sequences, for /metrics) and per sequence that asked for its routing."""
        bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
        for i, r in enumerate(routes):
            if r is None:
                continue
            slots = self.model.layer_experts(i).ids
            S = len(slots)
            # original ids back to slots: routes report original ids, counts are kept per slot
            slot_of = torch.full((max(slots) + 2,), S, dtype=torch.long)
            slot_of[torch.tensor(slots)] = torch.arange(S)
            chosen = slot_of[r.experts.cpu()]  # -1 (unused) maps to the last entry: S, dropped below
            if self.count_all_routes:
                self._on_layer_load(i, torch.bincount(chosen.flatten(), minlength=S + 1)[:S])
            for k, s in enumerate(seqs):
                if s.return_routing:
                    c = torch.bincount(chosen[bounds[k]:bounds[k + 1]].flatten(), minlength=S + 1)[:S]
                    s.step_counts[i] = s.step_counts.get(i, 0) + c

    def _finish(self, s: Sequence, ev: SeqEvent, reason: str) -> None:
        ev.finish_reason = reason
        self._release(s)
        self._emit(s, ev)

    def _prompt_logprobs(self, s: Sequence, rows: torch.Tensor) -> list[TokenInfo]:
        """Logprob of each prompt token given the ones before (the first has none)."""
        lp = torch.log_softmax(rows.float(), dim=-1)
        ids = s.prompt_ids
        out = [TokenInfo(ids[0], None, None)]
        k = s.logprobs or 0
        if len(ids) > 1:
            nxt = torch.tensor(ids[1:])
            chosen = lp[:-1].gather(1, nxt[:, None]).squeeze(1).tolist()
            if k > 0:
                tv, ti = torch.topk(lp[:-1], k, dim=-1)
                tv, ti = tv.tolist(), ti.tolist()
            for j, t in enumerate(ids[1:]):
                out.append(TokenInfo(t, chosen[j], list(zip(ti[j], tv[j])) if k > 0 else None))
        return out
