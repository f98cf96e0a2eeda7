"""The FastAPI app: routers, error handlers, middleware, and the state they share.

Every error, whatever raised it, leaves as `{"error": {"message", "type",
"param", "code"}}`; client input never produces a 500.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig
from .engine import Engine
from .entrypoints.openai.chat.api_router import router as chat_router
from .entrypoints.openai.completions.api_router import router as completions_router
from .entrypoints.openai.models.api_router import router as models_router
from .errors import APIError, error_body
from .registry import Registry, StartupError
from .security import BodySizeLimit

log = logging.getLogger("emo_serve")


@dataclass
class AppState:
    config: ServerConfig
    registry: Registry
    engine: Engine
    api_keys: list[bytes] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)


def build_state(config: ServerConfig, t0: float | None = None) -> AppState:
    registry = Registry.from_config(config)
    if config.verify:  # before the server listens: /health answers only once every profile is checked
        registry.verify_all()
        if registry.unavailable is not None:
            raise StartupError(f"--verify: {registry.unavailable}")
    model = registry.model
    max_len = min(config.max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    engine = Engine(model, registry, max_batch=config.max_batch, max_queue=config.max_queue, max_model_len=max_len,
                    max_prefill_tokens=config.max_prefill_tokens)
    state = AppState(config, registry, engine, [k.encode() for k in config.api_keys])
    if t0 is not None:
        state.started = t0
    return state


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error"}


def create_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        state.registry.start_verification()  # profiles still unchecked (without --verify): in the background
        yield
        state.engine.stop()

    app = FastAPI(title="emo-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.emo = state
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(models_router)
    app.add_middleware(BodySizeLimit, max_bytes=state.config.max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(error_body(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail), _STATUS_TYPES.get(e.status_code, "server_error")),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal server error ({type(e).__name__})", "server_error"),
                            status_code=500)

    return app
