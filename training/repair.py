"""Profile repair: what `emo-subset build --repair STEPS` and `emo-subset repair` run.

A profile keeps some experts of a mixture-of-experts model; for a standard MoE
the choice alone loses quality. Three optional steps, run in this order over a
trainable copy of the profile's routers and experts (`SubsetLM`), each on the
domain's calibration text:

- `merge` (REAM, MC-SMoE): every dropped expert is folded into the kept expert
  whose output on calibration tokens is most similar to its own (cosine of the
  outputs over the same tokens). The intermediate neurons of the dropped expert
  are first aligned to the kept one's (an assignment on the concatenated gate,
  up and down weights, as MC-SMoE aligns before merging), then the weights are
  averaged, weighted by each expert's routing mass on the calibration text.
  Router rows stay the kept expert's.
- `distill` (router-only distillation, arXiv 2603.02217): only the kept router
  rows train, so that the profile's next-token distribution matches the full
  model's on the calibration text (KL(full || profile), Adam).
- `finetune` (AllenAI's EMO recipe fine-tunes a selected subset): next-token
  cross-entropy on the domain's text, training the kept experts and router rows
  (attention, norms and embeddings stay frozen), for a number of steps.

`Repairer(steps, ...).fit(student_model, slots, token_lists, teacher)` returns
itself with `tensors_` (the new router and expert tensors, in the family's
naming, slots renumbered) and `record_` (what profile.json stores: steps, their
data and hyperparameters, losses, seconds, peak RSS).
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from modeling import Model

from .subset_lm import RepairError, SubsetLM

STEPS = ("merge", "distill", "finetune")


def parse_steps(spec: str) -> tuple[str, ...]:
    """`merge,distill,finetune` (any of them, run in that order)."""
    steps = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise RepairError(f"--repair {spec!r}: give one or more of {', '.join(STEPS)}, comma-separated")
    if len(set(steps)) != len(steps):
        raise RepairError(f"--repair {spec!r} names a step twice")
    return tuple(s for s in STEPS if s in steps)


@dataclass
class RepairParams:
    merge_tokens: int = 4096  # calibration tokens whose expert outputs decide the merge
    distill_steps: int = 100
    distill_lr: float = 3e-3
    finetune_steps: int = 100
    finetune_lr: float = 2e-4
    batch: int = 4  # sequences per step
    ctx: int = 256  # tokens per sequence (at most the model's context)
    seed: int = 0


class PeakRSS:
    """Peak resident set size of this process while the `with` block runs (sampled every 20 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.peak, self._stop = self._rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def sequences(token_lists: list[list[int]], ctx: int) -> list[list[int]]:
    """Documents cut into pieces of at most ctx tokens (none shorter than 2)."""
    out = [t[s:s + ctx] for t in token_lists for s in range(0, len(t), ctx)]
    return [s for s in out if len(s) >= 2]


def batches(seqs: list[list[int]], batch: int, pad: int, seed: int):
    """Endless shuffled batches: (tokens [B, L], mask [B, L]) padded at the end."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(seqs)))
        rng.shuffle(order)
        for s in range(0, len(order), batch):
            rows = [seqs[j] for j in order[s:s + batch]]
            L = max(len(r) for r in rows)
            toks = torch.full((len(rows), L), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), L, dtype=torch.bool)
            for b, r in enumerate(rows):
                toks[b, :len(r)] = torch.tensor(r)
                mask[b, :len(r)] = True
            yield toks, mask


def _kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    lt, ls = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return kl[mask].mean()


def _ce(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    tgt_mask = mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][tgt_mask], tokens[:, 1:][tgt_mask])


def _align(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Permutation of `other`'s rows (intermediate neurons, features [I, F]) that best
    matches `ref`'s (maximum total cosine similarity)."""
    a = F.normalize(ref, dim=-1)
    b = F.normalize(other, dim=-1)
    _, cols = linear_sum_assignment((a @ b.t()).numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


class Repairer:
    """See the module docstring. `on_progress(step, i, n, loss, tokens_per_s)` is called
    after each training step (the CLI draws a progress bar from it)."""

    def __init__(self, steps: tuple[str, ...], params: RepairParams | None = None,
                 on_progress: Callable[[str, int, int, float, float], None] | None = None,
                 on_step_done: Callable[[str, dict[str, torch.Tensor]], None] | None = None):
        self.steps, self.params, self.on_progress = steps, params or RepairParams(), on_progress
        self.on_step_done = on_step_done  # (step, tensors so far): lets a report evaluate every stage of one run

    def fit(self, student: Model, slots: dict[int, list[int]], token_lists: list[list[int]],
            teacher: Model | None = None, data: dict | None = None) -> "Repairer":
        """student: the model whose `slots` ({layer: slot indices}) the profile keeps (the
        base itself when building, the profile folder when repairing one); teacher: the
        full base model (merge and distill need it)."""
        p = self.params
        if not token_lists or not any(len(t) >= 2 for t in token_lists):
            raise RepairError("repair needs calibration text: the corpus gave no document of 2 tokens or more")
        if teacher is None and ("merge" in self.steps or "distill" in self.steps):
            raise RepairError(f"--repair {','.join(self.steps)}: merge and distill need the full base model")
        torch.manual_seed(p.seed)
        ctx = min(p.ctx, student.config.max_position_embeddings)
        seqs = sequences(token_lists, ctx)
        pad = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        pad = pad if 0 <= pad < student.config.vocab_size else 0
        self.lm_ = SubsetLM(student, slots)
        pool = {i: self.lm_.ids[i] for i in self.lm_.ids}
        check = seqs[0]
        self.record_ = {"steps": [], "data": {**(data or {}), "documents": len(token_lists),
                                              "tokens": int(sum(len(t) for t in token_lists)),
                                              "sequences": len(seqs), "ctx": ctx},
                        "check_max_abs_diff": self.lm_.check_against(student, check, pool)}
        self.teacher_ = None
        if teacher is not None:
            self.teacher_ = SubsetLM(teacher, trainable=False)
            self.teacher_.check_against(teacher, check, None)
        for step in self.steps:
            t0 = time.time()
            with PeakRSS() as rss:
                rec = getattr(self, "_" + step)(seqs, pad)
            rec = {"step": step, **rec, "seconds": round(time.time() - t0, 2), "peak_rss_bytes": rss.peak}
            self.record_["steps"].append(rec)
            if self.on_step_done is not None:
                self.on_step_done(step, self.lm_.expert_tensors(student.config.names))
        self.lm_.train_only()
        self.tensors_ = self.lm_.expert_tensors(student.config.names)
        return self

    # -- merge ---------------------------------------------------------------------
    @torch.no_grad()
    def _merge(self, seqs, pad) -> dict:
        p, lm, tl = self.params, self.lm_, self.teacher_
        rng = random.Random(p.seed)
        picked, n = [], 0
        for s in rng.sample(seqs, len(seqs)):
            if n >= p.merge_tokens:
                break
            picked.append(s[: p.merge_tokens - n])
            n += len(picked[-1])
        hs: dict[int, list[torch.Tensor]] = {}
        for s in picked:  # one sequence at a time: no padding among the captured rows
            cap: list = []
            tl(torch.tensor([s]), capture=cap)
            for i, h in cap:
                hs.setdefault(i, []).append(h)
        folded: dict[str, dict[str, list[int]]] = {}
        sims = []
        for i in lm.ids:
            h = torch.cat(hs[i])
            mass = tl.route(i, h).probs.sum(0)  # routing mass per base slot
            out = tl.experts_out(i, h).reshape(len(tl.ids[i]), -1)  # [E, T*H]
            out = F.normalize(out, dim=-1)
            base_ids = tl.ids[i]
            shared = tl.frozen[i]["shared"]
            kept_slots = [base_ids.index(e) for e in lm.ids[i]]
            kept_routed = [b for b in kept_slots if shared is None or not bool(shared[b])]
            groups: dict[int, list[int]] = {b: [] for b in kept_routed}
            for b, e in enumerate(base_ids):
                if b in kept_slots or (shared is not None and bool(shared[b])) or not kept_routed:
                    continue
                sim = out[kept_routed] @ out[b]
                j = int(sim.argmax())
                groups[kept_routed[j]].append(b)
                sims.append(float(sim[j]))
            k = str(i)
            for b, members in groups.items():
                if not members:
                    continue
                s = kept_slots.index(b)
                ref = torch.cat([lm.gate[k][s], lm.up[k][s], lm.down[k][s].t()], dim=1)  # [I, 3H]
                w = [float(mass[b])]
                acc = [lm.gate[k][s] * w[0], lm.up[k][s] * w[0], lm.down[k][s] * w[0]]
                for m in members:
                    g, u, d = tl.expert_weights(i, m)
                    perm = _align(ref, torch.cat([g, u, d.t()], dim=1))
                    wm = float(mass[m])
                    acc[0] += g[perm] * wm
                    acc[1] += u[perm] * wm
                    acc[2] += d[:, perm] * wm
                    w.append(wm)
                tot = sum(w)
                if tot <= 0:
                    continue
                lm.gate[k][s].copy_(acc[0] / tot)
                lm.up[k][s].copy_(acc[1] / tot)
                lm.down[k][s].copy_(acc[2] / tot)
                folded.setdefault(str(i), {})[str(lm.ids[i][s])] = [base_ids[m] for m in members]
        return {"tokens": n, "folded": folded, "mean_similarity": round(float(np.mean(sims)), 4) if sims else None,
                "weighting": "routing mass", "alignment": "neuron assignment on [gate|up|down^T]"}

    # -- distill and finetune ----------------------------------------------------------
    def _train(self, name: str, seqs, pad, steps: int, lr: float, groups: tuple[str, ...], loss_fn) -> dict:
        p = self.params
        params = self.lm_.train_only(*groups)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
        it = batches(seqs, p.batch, pad, p.seed)
        losses, toks, t0 = [], 0, time.time()
        for s in range(steps):
            tokens, mask = next(it)
            loss = loss_fn(tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            toks += int(mask.sum())
            if self.on_progress is not None:
                self.on_progress(name, s + 1, steps, losses[-1], toks / max(time.time() - t0, 1e-9))
        self.lm_.train_only()
        head, tail = losses[: max(1, steps // 10)], losses[-max(1, steps // 10):]
        return {"trained": list(groups), "steps": steps, "lr": lr, "batch": p.batch, "optimizer": "AdamW(0.9, 0.95)",
                "schedule": "linear warm-up 10%, cosine", "tokens": toks,
                "loss_first": round(float(np.mean(head)), 5) if losses else None,
                "loss_last": round(float(np.mean(tail)), 5) if losses else None,
                "tokens_per_second": round(toks / max(time.time() - t0, 1e-9), 1)}

    def _distill(self, seqs, pad) -> dict:
        def loss(tokens, mask):
            with torch.no_grad():
                t = self.teacher_(tokens)
            return _kl(t, self.lm_(tokens), mask)

        return {**self._train("distill", seqs, pad, self.params.distill_steps, self.params.distill_lr, ("router",),
                              loss), "objective": "KL(full || profile) of the next-token distribution"}

    def _finetune(self, seqs, pad) -> dict:
        def loss(tokens, mask):
            return _ce(self.lm_(tokens), tokens, mask)

        return {**self._train("finetune", seqs, pad, self.params.finetune_steps, self.params.finetune_lr,
                              ("router", "experts"), loss), "objective": "next-token cross-entropy"}

    def params_dict(self) -> dict:
        return asdict(self.params)
