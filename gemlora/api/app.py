"""The HTTP server: a FastAPI app over one running AsyncEngine.

Owns settings, the request-id header on every response, one log line and the metrics of every
request, error envelopes for errors no route caught, `/health` and `/metrics`, `/openapi.json` (the
hand-written document of `openapi`), and the routers of both dialects (`workers_ai`, `openai_api`) and of
the catalog (`catalog`: models, tasks, authors, accounts).
The engine runs on its own thread; handlers only await it. Knows nothing of KV blocks or slots.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gemlora.api.auth import Auth
from gemlora.api.body_limit import BodyLimit
from gemlora.api.disconnect import ClientDisconnected
from gemlora.api.errors import ApiError, bad_input
from gemlora.api.metrics import Metrics
from gemlora.api.openapi import openapi_document
from gemlora.api.textgen import TextGeneration, engine_failure
from gemlora.engine.async_engine import AsyncEngine, EngineError
from gemlora.finetunes.store import FinetuneStore
from gemlora.sampling import InvalidRequestError
from gemlora.text.tool_format import FORMATS

log = logging.getLogger("gemlora.api")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


@dataclass(slots=True)
class ServerSettings:
    model_names: tuple[str, ...]                 # names the base model answers to; the first is canonical
    data_dir: Path
    max_input_length: int = 4096                 # characters, per prompt or message (the seed schema)
    max_finetunes_per_account: int = 30
    max_adapter_file_bytes: int = 300 * 2**20
    max_body_bytes: int = 8 * 2**20              # any request body but an adapter upload's
    public_adapters_dir: Path | None = None
    tool_format: str | None = None               # how tools are written into prompts; None: from the tokenizer

    # multipart's boundaries and headers around one adapter file
    UPLOAD_OVERHEAD_BYTES = 64 * 2**10

    def __post_init__(self) -> None:
        for name in ("max_input_length", "max_finetunes_per_account", "max_adapter_file_bytes", "max_body_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if self.tool_format is not None and self.tool_format not in FORMATS:
            raise ValueError(f"tool_format must be one of {', '.join(FORMATS)}, not {self.tool_format!r}")

    def body_limit(self, path: str) -> int:
        """The largest body a request to `path` may send (gemlora.api.body_limit)."""
        if path.rstrip("/").endswith("/finetune-assets"):
            return self.max_adapter_file_bytes + self.UPLOAD_OVERHEAD_BYTES
        return self.max_body_bytes


@dataclass(slots=True)
class ServerContext:
    settings: ServerSettings
    engine: AsyncEngine
    store: FinetuneStore
    auth: Auth
    textgen: TextGeneration
    metrics: Metrics
    started: float = field(default_factory=time.time)


def finetune_store(engine: AsyncEngine, settings: ServerSettings) -> FinetuneStore:
    """The finetune store of `settings.data_dir`, validating uploads against the engine's model."""
    from gemlora.lora.adapter import load_adapter

    cfg = engine.model_config
    limits = dict(max_rank=engine.config.max_lora_rank, max_file_bytes=settings.max_adapter_file_bytes)
    return FinetuneStore(settings.data_dir, validate=lambda path: load_adapter(path, cfg, **limits).summary(),
                         max_file_bytes=settings.max_adapter_file_bytes,
                         max_per_account=settings.max_finetunes_per_account,
                         public_dir=settings.public_adapters_dir)


def create_app(engine: AsyncEngine, settings: ServerSettings, auth: Auth,
               generation: Callable[[FinetuneStore], TextGeneration] | None = None) -> FastAPI:
    """The app over `engine` (or what stands for one: gemlora.cluster's ReplicaPool); `generation` makes
    the text generation over the app's store (default: a TextGeneration in this process)."""
    from gemlora.api import catalog, openai_api, playground, workers_ai

    store = finetune_store(engine, settings)
    textgen = generation(store) if generation is not None else TextGeneration(engine, store, settings.tool_format)
    ctx = ServerContext(settings, engine, store, auth, textgen, Metrics(engine))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; end what is left.
        await asyncio.to_thread(engine.shutdown)
        log.warning("gemlora stopped: engine shut down")

    app = FastAPI(title="gemlora", version="0.1.0", lifespan=lifespan)
    # Hand-written (gemlora.api.openapi): the routes read raw bodies, so FastAPI's generated one has none.
    document = openapi_document(settings.model_names, max_input_length=settings.max_input_length,
                                anonymous=auth.anonymous)
    app.openapi = lambda: document
    app.state.ctx = ctx
    app.include_router(workers_ai.router)
    app.include_router(workers_ai.router, prefix="/client/v4")
    app.include_router(catalog.router)
    app.include_router(catalog.router, prefix="/client/v4")
    app.include_router(openai_api.router)
    app.include_router(openai_api.router, prefix="/client/v4/accounts/{account_id}/ai")
    app.include_router(openai_api.router, prefix="/accounts/{account_id}/ai")
    app.include_router(playground.router)      # the web page at / and /playground (static files only)
    app.add_middleware(BodyLimit, limit_for=settings.body_limit)

    @app.middleware("http")
    async def request_id_and_metrics(request: Request, call_next):
        # The request id is always the server's own: a client-chosen id must never key server state
        # (two callers sending the same one would share it). A well-formed client id is kept beside
        # it for correlation, in the log line and echoed back as x-client-request-id.
        request_id = uuid.uuid4().hex
        given = request.headers.get("cf-ai-req-id") or request.headers.get("x-request-id") or ""
        client_id = given if _REQUEST_ID.fullmatch(given) else None
        request.state.request_id = request_id
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["cf-ai-req-id"] = request_id
        response.headers["x-request-id"] = request_id
        if client_id:
            response.headers["x-client-request-id"] = client_id
        route = request.scope.get("route")
        ctx.metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        log.info("request %s%s %s %s -> %d in %.3fs", request_id, f" (client id {client_id})" if client_id else "",
                 request.method, request.url.path, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        rid = getattr(request.state, "request_id", None)
        body = exc.openai_body() if _is_openai(request) else exc.workers_ai_body(rid)
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(InvalidRequestError)
    async def refused_while_running(request: Request, exc: InvalidRequestError):
        # the engine refused a request after its first chunk (a schema its output cannot follow further)
        return await api_error(request, bad_input(str(exc), exc.field))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        log.error("request %s failed in the engine: %s", getattr(request.state, "request_id", "-"), exc)
        err = engine_failure(exc)
        return JSONResponse(err.openai_body() if _is_openai(request) else err.workers_ai_body(),
                            status_code=err.status)

    @app.exception_handler(ClientDisconnected)
    async def client_left(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)     # nobody reads it; the status is for the log and metrics

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        # A bug or a failing disk: still the dialect's envelope (Starlette logs the traceback and re-raises).
        # This runs outside the middleware, so the request id headers are set here.
        rid = getattr(request.state, "request_id", None)
        err = ApiError(3000, 500, "AiError: AiError: internal server error; please retry")
        return JSONResponse(err.openai_body() if _is_openai(request) else err.workers_ai_body(rid), status_code=500,
                            headers={"cf-ai-req-id": rid, "x-request-id": rid} if rid else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: 7003, 405: 7001}.get(exc.status_code, 7000)
        err = ApiError(code, exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")
        # A 405 must name every method of the path (RFC 9110); Starlette's names only the first route's.
        headers = {"Allow": ", ".join(_allowed_methods(request))} if exc.status_code == 405 else exc.headers
        return JSONResponse(err.openai_body() if _is_openai(request) else err.workers_ai_body(),
                            status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = ApiError(5006, 400, f"AiError: Bad input: {exc.errors()[0].get('msg', 'invalid request')}")
        return JSONResponse(err.openai_body() if _is_openai(request) else err.workers_ai_body(), status_code=400)

    @app.get("/health")
    async def health():
        state = engine.health()
        body = {"status": "ok" if state.stepping else "unavailable", "engine": state.detail,
                "model": settings.model_names[0], "uptime_s": round(time.time() - ctx.started, 1),
                "steps": state.steps, "anonymous": auth.anonymous}
        if not state.stepping:
            log.error("health check: %s", state.detail)
        return JSONResponse(body, status_code=200 if state.stepping else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _allowed_methods(request: Request) -> list[str]:
    # Asked of the router itself (which route would take this path with that method), as FastAPI nests
    # included routers.
    return sorted(m for m in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
                  if any(route.matches({**request.scope, "method": m})[0] == Match.FULL
                         for route in request.app.router.routes))


def _is_openai(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/v1/") or "/ai/v1/" in path
