"""The logic of POST /v1/routing: which experts a prompt's tokens use, per layer,
under a profile, and which hosted profile the text leans to. Nothing is generated.

The forward pass runs on the engine thread (the engine owns the model) through
`Engine.call`, between two batching steps, so it is the same code path and the
same pool masks that serve completions; the experts reported are the ones that
pass chose (`Model.routes`), not a recomputation.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from .... import metrics as M
from ....engine import EngineStopped, QueueFull
from ....errors import APIError, bad_request
from ....registry import FULL, AUTO
from ..input_processor import check_prompts, check_text_fits, parse_body
from .protocol import RoutingRequest


def routing_body(state, ids: list[int], profile: str) -> dict:
    """The response for `ids` under `profile` (engine thread only: runs forwards).

    `profile_affinity` is measured on the full model's routing (every loaded
    expert), so it describes the text, whichever profile routes it; under a
    restricted profile that costs one more forward."""
    reg = state.registry
    model = reg.model
    auto = None
    if profile == AUTO:
        auto = reg.auto_decision(ids)
        profile = auto["profile"]
    prof = reg.get(profile)
    if reg.unavailable is not None or prof.state == "failed":  # taken out of service while this call waited
        raise APIError(503, f"profile {profile!r} is out of service ({'; '.join(prof.problems[:2])})",
                       "unavailable", "profile", "profile_unavailable")
    out = model.routes(ids, prof.resolved)
    full_probs = out.router_probs if prof is reg.full else reg.full_router_probs(ids)
    layers = []
    for i, r in enumerate(out.routes):
        if r is None:
            continue
        experts, weights = [], []
        for e_row, w_row in zip(r.experts.tolist(), r.weights.tolist()):
            keep = [j for j, e in enumerate(e_row) if e >= 0]  # -1: the pool held fewer than k experts
            experts.append([e_row[j] for j in keep])
            weights.append([round(w_row[j], 6) for j in keep])
        layers.append({"layer": i, "experts": experts, "weights": weights})
    names = reg.names()
    if names:
        aff = reg.affinity(full_probs)  # [T, profiles]
        mean = {n: round(v, 6) for n, v in zip(names, aff.mean(0).tolist())}
        lean = [names[j] for j in aff.argmax(1).tolist()]
        per_token = [[round(v, 4) for v in row] for row in aff.tolist()]
    else:
        mean, lean, per_token = {}, [None] * len(ids), [[] for _ in ids]
    tok = model.tokenizer
    base = reg.base_name
    return {"object": "routing", "model": base if profile == FULL else f"{base}:{profile}", "profile": profile,
            "token_ids": ids, "tokens": [tok.token_text(t) if tok is not None else str(t) for t in ids],
            "top_k": model.config.top_k, "layers": layers,
            "profiles": names, "profile_affinity": mean, "token_profiles": lean, "token_affinity": per_token,
            **({"auto": auto} if auto is not None else {})}


async def create_routing(request: Request) -> dict:
    state = request.app.state.emo
    req = await parse_body(request, RoutingRequest)
    profile = state.registry.select(req.model, req.profile)
    request.state.access = {"profile": profile}
    try:  # counted in emo_requests_total as completions are, once the profile is known
        body = await _route(state, req, profile)
    except APIError as e:
        M.REQUESTS.labels(profile, str(e.status)).inc()
        raise
    M.REQUESTS.labels(profile, "ok").inc()
    return body


async def _route(state, req: RoutingRequest, profile: str) -> dict:
    if isinstance(req.prompt, str):
        tok = state.registry.model.tokenizer
        if tok is None:
            raise bad_request("prompt: this model has no tokenizer; send token ids", "prompt")
        check_text_fits(state, [req.prompt])
        ids = await asyncio.to_thread(tok.encode, req.prompt)  # a long text takes a while: off the event loop
    else:
        ids = list(req.prompt)
    # the limits of completions: empty prompt, token ids outside the vocabulary, the context length
    check_prompts(state, [ids], 0, 1, None)
    try:
        fut = state.engine.call(lambda: routing_body(state, ids, profile), tokens=2 * len(ids))
    except QueueFull as e:
        raise APIError(429, f"{e}; retry later", "rate_limit_error", None, "queue_full") from None
    except EngineStopped as e:
        raise APIError(503, str(e), "unavailable", None, "shutting_down") from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=state.config.request_timeout or None)
    except asyncio.TimeoutError:
        fut.cancel()
        raise APIError(504, "the request ran past its time limit", "timeout", None, "timeout") from None
