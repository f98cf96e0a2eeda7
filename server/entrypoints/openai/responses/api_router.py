"""HTTP route of POST /v1/responses."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from ..openapi import body_of
from .protocol import ResponseObject, ResponsesRequest
from .serving import create_response

router = APIRouter()


@router.post("/v1/responses", dependencies=[Depends(require_api_key)], openapi_extra=body_of(ResponsesRequest),
             responses={200: {"model": ResponseObject,
                              "description": "a response (with stream: server-sent events of typed events)"}})
async def responses(request: Request):
    return await create_response(request)
