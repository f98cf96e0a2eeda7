"""The logic of vLLM's tokenizer endpoints over the served model's tokenizer."""

from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import ValidationError

from ....errors import APIError, bad_request
from ....state import AppState
from ..chat.serving import render_prompt
from ..input_processor import parse_body, parse_json, validation_error
from .protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeCompletionRequest,
                       TokenizeResponse, TokenizerInfoResponse)


def _tokenizer(state: AppState):
    tok = state.registry.model.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer", "invalid_request_error", None, "no_tokenizer")
    return tok


def _check_model(state: AppState, model: str | None) -> None:
    if model:  # the same names /v1/models lists (every profile shares the base's tokenizer)
        state.registry.select(model, None)


async def tokenize(request: Request) -> TokenizeResponse:
    state: AppState = request.app.state.emo
    tok = _tokenizer(state)
    raw = await request.body()
    obj = await asyncio.to_thread(parse_json, raw)
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_body")
    schema = TokenizeChatRequest if "messages" in obj else TokenizeCompletionRequest
    try:
        req = schema.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None
    _check_model(state, req.model)

    def run() -> list[int]:
        if isinstance(req, TokenizeChatRequest):
            if tok.chat_template is None:
                raise APIError(400, "this model's tokenizer has no chat template", "invalid_request_error",
                               "messages", "no_chat_template")
            return render_prompt(state, req)[0]
        return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)

    ids = await asyncio.to_thread(run)
    strs = [tok.token_text(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(request: Request) -> DetokenizeResponse:
    state: AppState = request.app.state.emo
    tok = _tokenizer(state)
    req = await parse_body(request, DetokenizeRequest)
    _check_model(state, req.model)
    vocab = state.registry.model.config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens",
                          "invalid_token_id")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tok.decode, req.tokens, req.skip_special_tokens))


def tokenizer_info(state: AppState) -> TokenizerInfoResponse:
    tok = _tokenizer(state)
    cfg = {k: v for k, v in tok.config.items() if k != "tokenizer_class"}
    cfg.setdefault("eos_token", tok.eos_token)
    cfg.setdefault("bos_token", tok.bos_token)
    cfg.setdefault("chat_template", tok.chat_template)
    cfg["model_max_length"] = state.engine.max_model_len
    cls = tok.config.get("tokenizer_class")
    return TokenizerInfoResponse(tokenizer_class=cls if isinstance(cls, str) else "PreTrainedTokenizerFast", **cfg)
