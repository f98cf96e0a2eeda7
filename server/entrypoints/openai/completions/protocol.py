"""Request and response schemas of POST /v1/completions (OpenAI's fields, plus `profile`).

Types are strict where OpenAI's are: a string is not a number, a number is not
a string. Limits that depend on the server's settings (max_tokens, n,
logprobs, context length) are checked in `serving`, which knows them. Fields
OpenAI or vLLM define that this server does not implement are accepted only at
their neutral value; anything else is a 400 naming the field
(`unsupported_fields`), never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from modeling.sampling import SEED_RANGE

from ..routing.protocol import RoutingSummary

Number = StrictFloat | StrictInt
TokenIds = list[StrictInt]
Penalty = Annotated[Number, Field(ge=-2, le=2)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[StrictStr, Field(max_length=64)] = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any JSON value
    strict: StrictBool | None = None  # output always follows the schema here, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or JSON of a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    profile: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True  # (vLLM) False: special tokens stay in the output text
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] | None = None
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    # structured output (server.structured_outputs): at most one of these
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None  # vLLM: a JSON schema (object or its text)
    guided_regex: Annotated[StrictStr, Field(max_length=4096)] | None = None  # vLLM: output matches this regex
    guided_choice: Annotated[list[StrictStr], Field(min_length=1, max_length=256)] | None = None  # one of these
    guided_grammar: Annotated[StrictStr, Field(max_length=65536)] | None = None  # a Lark grammar (llguidance's)
    # defined by OpenAI or vLLM, not implemented here: only their neutral value is accepted
    best_of: StrictInt | None = None
    return_routing: StrictBool = False  # add a `routing` summary per choice (experts used per layer, affinity)

    def unsupported_fields(self) -> list[str]:
        """Names of fields set to something this server does not implement."""
        bad = []
        if self.best_of is not None and self.best_of != 1:
            bad.append("best_of")
        return bad


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    def unsupported_fields(self) -> list[str]:
        return super().unsupported_fields() + (["suffix"] if self.suffix else [])


# -- responses ---------------------------------------------------------------------

class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    profile: str | None = None  # the profile that served this choice
    routing: RoutingSummary | None = None  # with return_routing


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    """A whole completion, and (object "text_completion" too, as OpenAI streams
    it) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    profile: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def dump(m: BaseModel, exclude_unset_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object of a response model (fields in `exclude_unset_fields` are
    left out when they were never set, as OpenAI leaves out `usage` in chunks)."""
    d = m.model_dump(mode="json")
    for f in exclude_unset_fields:
        if f not in m.model_fields_set:
            d.pop(f, None)
    return d
