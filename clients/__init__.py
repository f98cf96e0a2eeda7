"""Python client for emo-serve: `Client`, `AsyncClient`, typed results, errors.

Usage: see clients/README.md.
"""

from .client import (
    DEFAULT_BASE_URL,
    AsyncClient,
    AsyncCompletionStream,
    Client,
    CompletionStream,
    __version__,
)
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    EmoError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    StreamError,
    UnprocessableEntityError,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    Completion,
    CompletionChunk,
    Health,
    ModelInfo,
    ProfileInfo,
    Usage,
)

__all__ = [
    "__version__",
    "DEFAULT_BASE_URL",
    "Client",
    "AsyncClient",
    "CompletionStream",
    "AsyncCompletionStream",
    "EmoError",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "RequestTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "ServiceUnavailableError",
    "InternalServerError",
    "StreamError",
    "Completion",
    "CompletionChunk",
    "Choice",
    "Usage",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ModelInfo",
    "ProfileInfo",
    "Health",
]
