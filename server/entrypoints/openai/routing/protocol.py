"""Request schema of POST /v1/routing (and the `return_routing` field completions share)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr


class RoutingRequest(BaseModel):
    """Which experts a prompt uses: `prompt` as text or token ids, routed under
    `profile` (or `model` = `<base>:<profile>`; default `full`)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    profile: StrictStr | None = None
    prompt: StrictStr | list[StrictInt]
