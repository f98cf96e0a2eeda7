"""HTTP route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from .serving import create_completion

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(require_api_key)])
async def completions(request: Request):
    return await create_completion(request)
