"""HTTP route of POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from ..openapi import body_of
from .protocol import ChatCompletionRequest, ChatCompletionResponse
from .serving import create_chat_completion

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)],
             openapi_extra=body_of(ChatCompletionRequest),
             responses={200: {"model": ChatCompletionResponse,
                              "description": "a chat completion (with stream: server-sent events of chunks)"}})
async def chat_completions(request: Request):
    return await create_chat_completion(request)
