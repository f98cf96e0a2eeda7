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


class LayerUse(BaseModel):
    layer: int
    experts: list[int]  # original ids the sequence's tokens were routed to
    tokens: list[int]  # how many tokens each


class RoutingSummary(BaseModel):
    """`return_routing` on completions and chat: per choice, the experts its tokens
    (prompt and generated) used per MoE layer, and the prompt's profile affinity."""

    layers: list[LayerUse]
    profile_affinity: dict[str, float]
