"""Request and response schemas of vLLM's tokenizer endpoints (POST /tokenize,
POST /detokenize, GET /tokenizer_info): same field names, defaults and shapes
as vLLM's, so that clients written for vLLM (lm-evaluation-harness's remote
tokenizer) work unchanged."""

from __future__ import annotations

from typing import Any, Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..chat.protocol import ChatMessage, ChatTool


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None  # rendered by the template, as chat does
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = False
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    tokens: list[StrictInt]
    skip_special_tokens: StrictBool = True  # as completions' (vLLM's) option: False keeps them in the text


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration (tokenizer_config.json), as vLLM answers it."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
