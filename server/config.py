"""Server settings, filled by `server.cli` (or by tests directly)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    model: str | None = None  # checkpoint folder or HF repo id; None: bundled demo (or the first profile)
    profiles: list[str] = field(default_factory=list)  # folders, or "name=experts.json"
    profiles_dirs: list[str] = field(default_factory=list)
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 16
    max_queue: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_prefill_tokens: int = 2048  # prompt tokens admitted per engine step (at least one prompt)
    device: str = "cpu"
    dtype: str | None = None
    quantize: str | None = None  # None (exact) or "int8" (weight-only, lazy)
    compile: bool = False  # compiled bf16 GEMV for single-row products (modeling.kernels)
    mxfp4_cache_bytes: int = 0  # dequantized MXFP4 experts kept (gpt-oss); 0 dequantizes at every use
    max_body_bytes: int = 1 << 20
    max_n: int = 16
    max_logprobs: int = 20
    max_stop: int = 16
    request_timeout: float = 600.0  # seconds; 0: no limit
    max_request_logprobs: int = 1 << 18  # logprob values one request may ask for (sequences x tokens x (1 + logprobs))
    public_metrics: bool = False  # /metrics without the API key
    shutdown_timeout: float = 5.0  # on SIGTERM: seconds running requests may finish before they are failed (503)
    verify: bool = False  # check profile hashes before serving (default: in the background after start)
    reverify_interval: float = 0.0  # seconds between background re-hashes of the served files; 0: none
    # read leases on the mapped files (server.leases); taken only when the state is built on the
    # main thread (they need a SIGIO handler, which only the main thread may install)
    file_leases: bool = True
    log_level: str = "info"
    auto_rule: str = "fit"  # how profile "auto" picks: fit, affinity, centroid or perplexity (server.registry)
    auto_min_fit: float = 0.0  # "auto" serves "full" when no profile's fit reaches this (0: never)
    tool_call_parser: str | None = None  # tool-call format (server.tool_parsers); None: from the chat template
    reasoning_parser: str | None = None  # "think" or "none"; None: from the chat template (server.reasoning)
    expert_metrics: bool = True  # per-layer expert-load counters at /metrics (layers x experts series)


def context_length(config: ServerConfig, model_limit: int) -> tuple[int, bool]:
    """(the context length to serve, whether --max-model-len was capped to the model's limit).
    One rule for the engine and for deploy/memory_request.py, which sizes its KV cache."""
    asked = config.max_model_len
    if asked is None:
        return model_limit, False
    return min(asked, model_limit), asked > model_limit
