"""HTTP route of POST /v1/routing."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from .serving import create_routing

router = APIRouter()


@router.post("/v1/routing", dependencies=[Depends(require_api_key)])
async def routing(request: Request):
    return await create_routing(request)
