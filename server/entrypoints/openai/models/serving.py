"""GET /v1/models, /v1/profiles, /health, /metrics: what the server hosts and how it is doing."""

from __future__ import annotations

import asyncio
import time

from ....memory import process_rss_bytes
from .... import metrics as M
from ....state import AppState


def list_models(state: AppState) -> dict:
    """Every model id a request may name: the base (profile "full"), `<base>:full`,
    `<base>:auto` and `<base>:<profile>` for each hosted profile."""
    reg = state.registry
    created = int(state.started_wall)
    data = [{"id": reg.base_name, "object": "model", "created": created, "owned_by": "emo-serve",
             "profile": "full", "max_model_len": state.engine.max_model_len}]
    for name in ["full", *reg.names(), "auto"]:
        data.append({"id": f"{reg.base_name}:{name}", "object": "model", "created": created, "owned_by": "emo-serve",
                     "root": reg.base_name, "parent": reg.base_name, "profile": name,
                     "max_model_len": state.engine.max_model_len})
    return {"object": "list", "data": data}


async def list_profiles(state: AppState) -> dict:
    # mincore over every expert page: cheap, but off the event loop all the same
    return await asyncio.to_thread(state.registry.describe)


def health(state: AppState) -> dict:
    eng = state.engine
    if eng.alive and eng.drain_deadline is None:
        status = "ok"
    elif eng.drain_deadline is not None or eng.stopped:
        status = "shutting down"
    else:
        status = f"engine stopped ({eng.failure or 'thread ended'})"
    pending = state.registry.verifying()
    if status == "ok" and pending:  # serving, but from bytes not checked yet (background verification)
        status = "verifying"
    if state.registry.unavailable is not None:
        status = f"weights failed verification: {state.registry.unavailable}"
    return {"status": status, "model": state.registry.base_name, "verifying": pending,
            "profiles": state.registry.names(), "uptime_s": round(time.monotonic() - state.started, 3),
            "running": len(eng.running), "waiting": len(eng.waiting) + len(eng.probing)}


async def render_metrics(state: AppState) -> tuple[bytes, str]:
    def update() -> None:
        for name in [*state.registry.names(), "full"]:
            b = state.registry.resident_expert_bytes(name)
            if b is not None:
                M.PROFILE_RESIDENT.labels(name).set(b)
        M.PROCESS_RSS.set(process_rss_bytes())
    await asyncio.to_thread(update)
    return M.render()
