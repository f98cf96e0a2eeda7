"""The engine: one background thread owns the model and runs a continuous-batching loop.

Every step has three parts (vLLM's split):

- `_schedule`: drop sequences that were cancelled or ran past their deadline,
  admit waiting ones into free cache slots (up to a prompt-token budget per
  step) and lay out ONE packed batch: the new prompts and the one new token of
  every running sequence, prefill and decode together, each sequence with its
  own pool (profile) and its own slot of one shared `KVCache`;
- `_execute`: the forward pass over that batch;
- `_process_outputs`: sample (vectorized over rows), logprobs, the token-level
  stops (stop ids, `min_tokens`, `max_tokens`, a complete grammar) and one
  event per sequence: token ids and logprobs, never text.

That is vLLM v1's engine core. The two other parts run on the asyncio side:
the input processor (tokenize, validate, resolve the profile name; in
`entrypoints/openai/serving_engine.py`) and the output processor
(`server/output_processor.py`: detokenization, stop strings, the routing
summary), so that text never costs the engine thread a step. A stop string
found there ends the sequence: the request cancels it, and the engine drops
it before its next step (what it generated meanwhile is never shown).

Work that runs on the model outside the packed batch (side work) is
scheduled fairly beside it: the `auto` probe of a sequence (which profile
its prompt leans to, and the prompt's profile affinity for `return_routing`)
and the passes of POST /v1/routing. Each step runs at most one unit of each
kind, in arrival order within a kind, while the step's token budget
(`max_prefill_tokens`) lasts (the first unit always runs); the prefill
admitted in the same step gets what is left (at least one prompt). So no
kind starves another, running streams advance every step, and one step's
work is bounded in tokens.

A failure is contained to the sequence that caused it: a sequence that cannot
be set up, run or processed is failed alone (the others of the batch go on),
and a batch whose forward raises is retried one sequence at a time. If the
thread itself dies, `alive` turns false: new work is refused and everything in
flight is failed (the asyncio side checks too).

The asyncio side never touches the model: it submits `Sequence`s (a bounded
queue; `QueueFull` when full) and receives `SeqEvent`s through a sink that the
engine calls from its thread (`loop.call_soon_threadsafe`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from modeling import Batch, Model, ResolvedPool, SamplingParams
from modeling.decoding import TokenState
from modeling.sampling import sample_next

from . import metrics as M
from .registry import FULL

log = logging.getLogger("emo_serve.engine")


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


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
    profile: str  # a hosted profile name, "full" or "auto"
    sink: Callable[[SeqEvent], None]
    logprobs: int | None = None  # top-n logprobs of generated tokens (None: none)
    prompt_logprobs: bool = False
    deadline: float | None = None  # time.monotonic()
    return_routing: bool = False  # count the experts its tokens used per layer (`expert_counts`)
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
    prompt_affinity: dict[str, float] | None = None  # with return_routing: share of the prompt's routing per profile
    probed: bool = False  # the auto / return_routing probe ran (or was not needed)
    nll: dict[str, float] | None = None  # auto by perplexity: the profiles scored so far
    nll_left: list[str] = field(default_factory=list)  # ... and those still to score, one per probe unit

    @property
    def needs_probe(self) -> bool:
        return not self.probed and (self.profile == "auto" or self.return_routing)

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread between steps


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


class Engine:
    def __init__(self, model: Model, registry, max_batch: int = 16, max_queue: int = 256,
                 max_model_len: int | None = None, max_prefill_tokens: int = 2048, expert_metrics: bool = True):
        self.model, self.registry = model, registry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = model.new_cache(max_batch, self.max_model_len)
        self.free_slots = list(range(max_batch))[::-1]
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # side work that runs on the model outside the packed batch (see the module docstring):
        # POST /v1/routing passes as (fn, future, tokens), and sequences waiting for their probe
        self.tasks: collections.deque[tuple[Callable[[], object], concurrent.futures.Future, int]] = \
            collections.deque()
        self.probing: collections.deque[Sequence] = collections.deque()
        self._side_turn = 0  # which kind of side work goes first this step (round robin)
        self.expert_load = M.ExpertLoad(model, registry.moe_layers) if expert_metrics else None
        self.cv = threading.Condition()
        self.stopped = False
        self.failure: str | None = None  # why the engine thread died, once it has
        self.drain_deadline: float | None = None  # shutting down: fail what is left after this time
        self.steps = 0
        # held over each step and its side work: `wait_for_step` returns once the step in flight,
        # scheduled perhaps with pools that are no longer sound, has ended
        self.step_lock = threading.Lock()
        self.eos_ids = model.eos_ids
        self.thread = threading.Thread(target=self._loop, name="emo-engine", daemon=True)

    # -- asyncio side ----------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.failure is None and not self.stopped

    def begin_shutdown(self, grace_s: float) -> None:
        """Refuse new work; sequences still running after `grace_s` seconds are
        failed with 503 (their streams end with an error event). Lock-free: it is
        called from a signal handler."""
        self.drain_deadline = time.monotonic() + max(0.0, grace_s)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` (one request's choices) or none of them."""
        with self.cv:
            if self.stopped or self.drain_deadline is not None:
                raise EngineStopped("the server is shutting down")
            if not self.thread.is_alive() or self.failure is not None:
                raise EngineStopped(f"the engine is not running ({self.failure or 'thread stopped'})")
            queued = len(self.waiting) + len(self.probing)
            if queued + len(seqs) > self.max_queue:
                raise QueueFull(f"the queue is full ({queued} waiting, at most {self.max_queue})")
            self.waiting.extend(seqs)
            M.QUEUE_DEPTH.set(len(self.waiting))
            self.cv.notify_all()

    def call(self, fn: Callable[[], object], tokens: int = 1) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between two steps (the engine owns the
        model), as one unit of side work costing `tokens` of a step's budget; the
        future holds its result or exception. Counts toward the queue."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.cv:
            if self.stopped or self.drain_deadline is not None:
                raise EngineStopped("the server is shutting down")
            if not self.thread.is_alive() or self.failure is not None:
                raise EngineStopped(f"the engine is not running ({self.failure or 'thread stopped'})")
            queued = len(self.waiting) + len(self.probing) + len(self.tasks)
            if queued >= self.max_queue:
                raise QueueFull(f"the queue is full ({queued} waiting, at most {self.max_queue})")
            self.tasks.append((fn, fut, max(1, tokens)))
            self.cv.notify_all()
        return fut

    def _run_side_work(self) -> int:
        """At most one unit of each kind of side work (a /v1/routing pass, an auto
        probe), kinds in turn, while the step's token budget lasts; returns the
        tokens spent. A cancelled routing call or an expired sequence costs nothing."""
        budget = self.max_prefill_tokens
        spent = 0
        kinds = [self._next_routing_task, self._next_probe]
        self._side_turn = (self._side_turn + 1) % len(kinds)
        for take in kinds[self._side_turn:] + kinds[:self._side_turn]:
            unit = take(budget - spent, first=spent == 0)
            if unit is not None:
                spent += unit()
        return spent

    def _next_routing_task(self, left: int, first: bool) -> Callable[[], int] | None:
        with self.cv:
            while self.tasks and self.tasks[0][1].cancelled():
                self.tasks.popleft()
            if not self.tasks or (not first and self.tasks[0][2] > left):
                return None
            fn, fut, tokens = self.tasks.popleft()

        def run() -> int:
            if not fut.set_running_or_notify_cancel():
                return 0
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, who turns it into an HTTP answer
                fut.set_exception(e)
            return tokens
        return run

    def _next_probe(self, left: int, first: bool) -> Callable[[], int] | None:
        now = time.monotonic()
        with self.cv:
            while self.probing and self._expired(self.probing[0], now):
                self.probing.popleft()
            if not self.probing or (not first and self._probe_cost(self.probing[0]) > left):
                return None
            s = self.probing.popleft()

        def run() -> int:
            try:
                self._probe(s)
            except Exception as e:
                log.exception("the probe of a sequence failed")
                self._fail(s, 500, "server_error", f"cannot start the sequence: {type(e).__name__}")
                return self._probe_cost(s)
            with self.cv:
                if s.probed:  # first in line for a slot
                    self.waiting.appendleft(s)
                else:  # more forwards to go (perplexity rule): back in the probe queue
                    self.probing.append(s)
                self.cv.notify_all()
            return self._probe_cost(s)
        return run

    def _probe_cost(self, s: Sequence) -> int:
        return len(s.prompt_ids)  # every unit of a probe is one forward over the prompt

    def _probe(self, s: Sequence) -> None:
        """One unit of the sequence's probe: which profile `auto` serves it with, and
        the prompt's profile affinity for `return_routing`. One forward of the full
        model's router serves both; the perplexity rule scores one profile per unit
        (one forward each), so a step never runs more than one of them. Before those,
        when `--auto-min-fit` is set or the affinity is asked for, the perplexity
        rule runs the full model's routing as a unit of its own: a prompt that no
        profile fits well enough is served by `full`, as by every other rule."""
        reg = self.registry
        if s.profile == "auto" and reg.auto_rule == "perplexity":
            if s.nll is None:
                s.nll = {}
                s.nll_left = [p.name for p in reg.perplexity_candidates(s.prompt_ids)]
                if s.nll_left and (reg.auto_min_fit > 0 or s.return_routing):
                    probs = reg.full_router_probs(s.prompt_ids)
                    self._note_affinity(s, probs)
                    if reg.auto_falls_back(probs):
                        s.profile, s.nll_left, s.probed = FULL, [], True
                    return
            if s.nll_left:
                name = s.nll_left.pop(0)
                if reg.profiles[name].state != "failed":  # out of service since: never scored, never chosen
                    s.nll[name] = reg.prompt_nll(s.prompt_ids, reg.profiles[name])
                if s.nll_left:
                    return
                sound = {n: v for n, v in s.nll.items() if reg.profiles[n].state != "failed"}
                s.profile = min(sound, key=sound.get) if sound else FULL
                s.probed = True  # with return_routing, the affinity was noted in the first unit
                return
        probs = None
        if s.return_routing or s.profile == "auto":  # every rule but perplexity reads the full routing
            probs = reg.full_router_probs(s.prompt_ids)
        if s.profile == "auto":
            s.profile = reg.choose_auto(s.prompt_ids, router_probs=probs)
        self._note_affinity(s, probs)
        s.probed = True

    def _note_affinity(self, s: Sequence, probs) -> None:
        """With return_routing: the share of the prompt's full-model routing per profile."""
        if s.return_routing and self.registry.names():
            shares = self.registry.affinity(probs).mean(0).tolist()
            s.prompt_affinity = dict(zip(self.registry.names(), shares))

    def wait_for_step(self) -> None:
        """Return once the step in flight (if any) has ended: every later step reads
        the registry's profiles afresh (a withdrawn profile's sequences are failed)."""
        with self.step_lock:
            pass

    def wake(self) -> None:
        with self.cv:
            self.cv.notify_all()

    # -- engine thread -----------------------------------------------------------------
    def _warm_up(self) -> None:
        """With --compile, compile the decode kernels before the first request
        (a scratch cache slot of 2 tokens; requests meanwhile wait in the queue)."""
        if not getattr(self.model.transformer, "compile_decode", False):
            return
        t0 = time.monotonic()
        cache = self.model.new_cache(1, 2)
        for pos in range(2):
            self.model.forward(Batch(torch.tensor([0]), [0], [pos], [1]), cache)
        log.info("compiled the decode kernels in %.1f s", time.monotonic() - t0)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            try:
                self._warm_up()
            except Exception:  # a failed warm-up only costs the first request its compile time
                log.exception("warm-up failed")
            while True:
                with self.cv:
                    while (not self.stopped and not self.waiting and not self.running and not self.tasks
                           and not self.probing):
                        self.cv.wait(timeout=1.0)
                    if self.stopped:
                        break
                if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                    self._fail_all(503, "unavailable", "the server is shutting down")
                    continue
                try:
                    with self.step_lock:
                        spent = self._run_side_work()
                        self._step(prefill_budget=max(0, self.max_prefill_tokens - spent))
                except Exception as e:  # a bug must not kill the loop: fail this step's sequences
                    log.exception("engine step failed")
                    for s in list(self.running):
                        self._fail(s, 500, "server_error", f"internal error in the engine: {type(e).__name__}")
            self._fail_all(503, "unavailable", "the server is shutting down")
        except BaseException as e:
            self.failure = f"engine thread died: {type(e).__name__}"
            log.critical("the engine thread died; new requests get 503", exc_info=True)
            self._fail_all(503, "unavailable", "the engine stopped (internal error); the server needs a restart")
            if not isinstance(e, Exception):
                raise

    def _fail_all(self, status: int, etype: str, msg: str) -> None:
        with self.cv:
            left = list(self.running) + list(self.waiting) + list(self.probing)
            self.waiting.clear()
            self.probing.clear()
            tasks = list(self.tasks)
            self.tasks.clear()
        for _, fut, _ in tasks:
            if not fut.done():
                fut.set_exception(EngineStopped(msg))
        for s in left:
            self._fail(s, status, etype, msg)
        M.QUEUE_DEPTH.set(0)

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
        M.RUNNING.set(len(self.running))

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

    def _admit(self, budget: int) -> list[Sequence]:
        """Waiting sequences into free slots while `budget` prompt tokens last (at
        least one); one that still needs its probe goes to the probe queue instead."""
        now = time.monotonic()
        new: list[Sequence] = []
        with self.cv:
            self.waiting = collections.deque(s for s in self.waiting if not self._expired(s, now))
            while self.waiting and self.free_slots:
                nxt = self.waiting[0]
                if nxt.needs_probe:
                    self.probing.append(self.waiting.popleft())
                    continue
                if new and len(nxt.prompt_ids) > budget:
                    break
                self.waiting.popleft()
                budget -= len(nxt.prompt_ids)
                nxt.slot = self.free_slots.pop()
                self.running.append(nxt)
                new.append(nxt)
            M.QUEUE_DEPTH.set(len(self.waiting))
        ok = []
        for s in new:
            try:
                self._setup(s)
                ok.append(s)
            except Exception as e:
                log.exception("cannot set up a sequence")
                self._fail(s, 500, "server_error", f"cannot start the sequence: {type(e).__name__}")
        return ok

    def _refresh_pools(self) -> None:
        """Each running sequence's pool as the registry has it now: a profile taken
        out of service (its files failed verification or are being changed) fails
        its sequences; `full` loses the experts no sound source holds any more."""
        for s in list(self.running):
            p = self.registry.get(s.profile)
            if self.registry.unavailable is not None or p.state == "failed":
                self._fail(s, 503, "profile_unavailable", f"profile {s.profile!r} went out of service while "
                           f"serving this request ({'; '.join(p.problems[:2]) or self.registry.unavailable})")
            else:
                s.pool = p.resolved

    def _setup(self, s: Sequence) -> None:
        s.pool = self.registry.get(s.profile).resolved
        s.decode = TokenState(s.params, self.eos_ids)
        s.output = s.decode.output  # one list: what sampling's penalties read is what the state appends to
        self.cache.lengths[s.slot] = 0
        self._emit(s, SeqEvent(profile=s.profile))

    def _step(self, prefill_budget: int | None = None) -> None:
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
        M.RUNNING.set(len(self.running))
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
        want_routes = self.expert_load is not None or any(s.return_routing for s in plan.seqs)
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
            M.PROMPT_TOKENS.inc(n_new_prompt)

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
            if self.expert_load is not None:
                self.expert_load.add(i, torch.bincount(chosen.flatten(), minlength=S + 1)[:S])
            for k, s in enumerate(seqs):
                if s.return_routing:
                    c = torch.bincount(chosen[bounds[k]:bounds[k + 1]].flatten(), minlength=S + 1)[:S]
                    s.step_counts[i] = s.step_counts.get(i, 0) + c

    def routing_summary(self, counts: dict[int, torch.Tensor], affinity: dict[str, float] | None) -> dict:
        """The compact `routing` object of a response: per MoE layer the experts its
        tokens used (original ids) and how many tokens each (`counts`: per layer, tokens
        per slot); the prompt's profile affinity."""
        layers = []
        for i, c in sorted(counts.items()):
            ids = self.model.layer_experts(i).ids
            used = [(ids[j], int(n)) for j, n in enumerate(c.tolist()) if n]
            layers.append({"layer": i, "experts": [e for e, _ in used], "tokens": [n for _, n in used]})
        return {"layers": layers, "profile_affinity": affinity or {}}

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
