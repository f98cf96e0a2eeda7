"""HTTP route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from ..openapi import body_of
from .protocol import CompletionRequest, CompletionResponse
from .serving import create_completion

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(require_api_key)], openapi_extra=body_of(CompletionRequest),
             responses={200: {"model": CompletionResponse,
                              "description": "a completion (with stream: server-sent events of chunks)"}})
async def completions(request: Request):
    return await create_completion(request)
