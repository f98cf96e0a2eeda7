"""HTTP routes of GET /v1/models, /v1/profiles, /health, /metrics.

/health is open (no key) so that load balancers and Kubernetes probes can use
it; it tells nothing a client could not learn from a refused request. /metrics
follows the API key unless the server was started with --public-metrics (for a
Prometheus scraper inside a trusted network)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ....security import require_api_key
from .serving import health, list_models, list_profiles, render_metrics

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(request: Request):
    return list_models(request.app.state.emo)


@router.get("/v1/profiles", dependencies=[Depends(require_api_key)])
async def profiles(request: Request):
    return await list_profiles(request.app.state.emo)


@router.get("/health")
async def get_health(request: Request):
    body = health(request.app.state.emo)
    # "verifying": serving while the background check of the profiles' files runs
    return JSONResponse(body, status_code=200 if body["status"] in ("ok", "verifying") else 503)


@router.get("/metrics")
async def metrics(request: Request):
    state = request.app.state.emo
    if not state.config.public_metrics:
        require_api_key(request)
    data, ctype = await render_metrics(state)
    return Response(data, media_type=ctype)
