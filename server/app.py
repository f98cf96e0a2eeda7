"""The FastAPI app: routers, error handlers, middleware, and the state they share.

Every error, whatever raised it, leaves as `{"error": {"message", "type",
"param", "code"}}`; client input never produces a 500. A 5xx answer closes the
connection (`Connection: close`): after a server-side failure a client should
not reuse it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig, context_length
from .engine import Engine
from .entrypoints.openai import openapi
from .entrypoints.openai.chat.api_router import router as chat_router
from .entrypoints.openai.completions.api_router import router as completions_router
from .entrypoints.openai.models.api_router import router as models_router
from .entrypoints.openai.request_run import ClientDisconnected
from .entrypoints.openai.tokenize.api_router import router as tokenize_router
from .entrypoints.openai.responses.api_router import router as responses_router
from .entrypoints.openai.routing.api_router import router as routing_router
from .errors import APIError, error_body
from .leases import FileLeases
from .registry import Registry, StartupError
from .security import BodySizeLimit, RequireKey, printable
from .state import AppState

log = logging.getLogger("emo_serve")
access_log = logging.getLogger("emo_serve.access")
UI_DIR = Path(__file__).resolve().parent / "ui"

__all__ = ["AppState", "build_state", "create_app", "context_length"]


def build_state(config: ServerConfig, t0: float | None = None) -> AppState:
    registry = Registry.from_config(config)
    if config.verify:  # before the server listens: /health answers only once every profile is checked
        registry.verify_all()
        if registry.unavailable is not None:
            raise StartupError(f"--verify: {registry.unavailable}")
    model = registry.model
    max_len, _ = context_length(config, model.config.max_position_embeddings)
    engine = Engine(model, registry, max_batch=config.max_batch, max_queue=config.max_queue, max_model_len=max_len,
                    max_prefill_tokens=config.max_prefill_tokens, expert_metrics=config.expert_metrics)
    state = AppState(config, registry, engine, [k.encode() for k in config.api_keys])
    if t0 is not None:
        state.started = t0
    if config.file_leases and threading.current_thread() is threading.main_thread():
        state.leases = FileLeases(registry, engine).take()
    return state


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 429: "rate_limit_error"}


def _json_error(body: dict, status: int, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status >= 500:
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=headers or None)


class AccessLog:
    """One line per request once its answer is sent: client, method, path, status,
    latency, and for generation requests profile and token counts (a handler
    puts them in `request.state.access`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = [0]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            extra = scope.get("state", {}).get("access")
            client = scope.get("client") or ("-", 0)
            fields = ""
            if extra:
                fields = " " + " ".join(f"{k}={v}" for k, v in extra.items())
            access_log.info('%s:%s "%s %s" %s%s latency=%.3fs', client[0], client[1], printable(scope["method"]),
                            printable(scope["path"]), status[0] or "-", printable(fields), time.monotonic() - t0)


def create_app(state: AppState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        # profiles still unchecked (without --verify): in the background; then every --reverify-interval
        state.registry.start_verification(state.config.reverify_interval)
        yield
        state.engine.stop()
        if state.leases is not None:
            state.leases.stop()

    app = FastAPI(title="emo-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.emo = state
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(responses_router)
    app.include_router(models_router)
    app.include_router(tokenize_router)
    openapi.install(app)
    app.include_router(routing_router)
    # The routing page: static files, no secrets in them; its API calls carry the key.
    app.mount("/ui/", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app.add_api_route("/ui", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    app.add_middleware(RequireKey, keys=state.api_keys)
    app.add_middleware(BodySizeLimit, max_bytes=state.config.max_body_bytes)
    app.add_middleware(AccessLog)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _json_error(e.body(), e.status, headers)

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, _: ClientDisconnected):
        # nobody reads this answer; nginx's 499 names what happened in the access line
        log.info("client disconnected before %s %s was answered; its work is cancelled", request.method,
                 request.url.path)
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(error_body(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _json_error(error_body(e.status_code, str(e.detail), _STATUS_TYPES.get(e.status_code, "server_error")),
                           e.status_code, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return _json_error(error_body(500, f"internal server error ({type(e).__name__})", "server_error"), 500)

    return app
