"""HTTP routes of vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ....security import require_api_key
from ..openapi import body_of
from .protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                       TokenizeResponse, TokenizerInfoResponse)
from .serving import detokenize, tokenize, tokenizer_info

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_api_key)], response_model=TokenizeResponse,
             openapi_extra=body_of(TokenizeCompletionRequest, TokenizeChatRequest))
async def post_tokenize(request: Request):
    return await tokenize(request)


@router.post("/detokenize", dependencies=[Depends(require_api_key)], response_model=DetokenizeResponse,
             openapi_extra=body_of(DetokenizeRequest))
async def post_detokenize(request: Request):
    return await detokenize(request)


@router.get("/tokenizer_info", dependencies=[Depends(require_api_key)], response_model=TokenizerInfoResponse)
async def get_tokenizer_info(request: Request):
    return tokenizer_info(request.app.state.emo)
