"""The server's engine: one background thread owns the model and drives the
engine core (`modeling.engine_core.EngineCore`: schedule, execute, process
outputs over packed batches of token ids) in a continuous-batching loop. It
adds what a server needs around the core: a bounded queue and admission into
free cache slots (up to a prompt-token budget per step), the profile pools of
the registry (a profile taken out of service fails its sequences), metrics,
and side work.

vLLM v1's split: the input processor (tokenize, validate, resolve the profile
name) and the output processor (`modeling.output_processor`: detokenization,
stop strings, the routing summary) run on the asyncio side per request
(`entrypoints/openai/input_processor.py` and `request_run.py`), so text never costs the engine
thread a step. A stop string found there ends the sequence: the request
cancels it, and the engine drops it before its next step (what it generated
meanwhile is never shown).

Work that runs on the model outside the packed batch (side work) is
scheduled fairly beside it: the `auto` probe of a sequence (which profile
its prompt leans to, and the prompt's profile affinity for `return_routing`)
and the passes of POST /v1/routing. Each step runs at most one unit of each
kind, in arrival order within a kind, while the step's token budget
(`max_prefill_tokens`) lasts (the first unit always runs); the prefill
admitted in the same step gets what is left (at least one prompt). So no
kind starves another, running streams advance every step, and one step's
work is bounded in tokens.

A failure is contained to the sequence that caused it (see the core); if the
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

from modeling import Batch, Model
from modeling.engine_core import EngineCore, SeqEvent, TokenInfo
from modeling.engine_core import Sequence as CoreSequence

from . import metrics as M
from .registry import FULL

log = logging.getLogger("emo_serve.engine")

__all__ = ["Engine", "EngineStopped", "QueueFull", "SeqEvent", "Sequence", "TokenInfo"]


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass
class Sequence(CoreSequence):
    """A request's sequence as the server's engine runs it: the core's, plus its probe."""

    prompt_affinity: dict[str, float] | None = None  # with return_routing: share of the prompt's routing per profile
    probed: bool = False  # the auto / return_routing probe ran (or was not needed)
    nll: dict[str, float] | None = None  # auto by perplexity: the profiles scored so far
    nll_left: list[str] = field(default_factory=list)  # ... and those still to score, one per probe unit

    @property
    def needs_probe(self) -> bool:
        return not self.probed and (self.profile == "auto" or self.return_routing)


class Engine(EngineCore):
    def __init__(self, model: Model, registry, max_batch: int = 16, max_queue: int = 256,
                 max_model_len: int | None = None, max_prefill_tokens: int = 2048, expert_metrics: bool = True):
        super().__init__(model, max_batch, max_model_len or model.config.max_position_embeddings,
                         max_prefill_tokens, count_all_routes=expert_metrics)
        self.registry, self.max_queue = registry, max_queue
        self.waiting: collections.deque[Sequence] = collections.deque()
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
        # held over each step and its side work: `wait_for_step` returns once the step in flight,
        # scheduled perhaps with pools that are no longer sound, has ended
        self.step_lock = threading.Lock()
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
                        self.step(prefill_budget=max(0, self.max_prefill_tokens - spent))
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

    # -- the core's hooks --------------------------------------------------------------
    def _on_running(self) -> None:
        M.RUNNING.set(len(self.running))

    def _on_prompt_tokens(self, n: int) -> None:
        M.PROMPT_TOKENS.inc(n)

    def _on_layer_load(self, layer: int, load: torch.Tensor) -> None:
        self.expert_load.add(layer, load)

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
        super()._setup(s)

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
