"""The FastAPI application: routes, API-key check, CORS, error shapes, health and metrics.

`create_app(settings, load_engine)` returns an app that starts loading the engine in a
background thread at start-up; until it is ready /health answers 503 and generation routes 503
with "Loading model", so orchestrators and clients can wait instead of failing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktrans_server import metrics, ollama_api, openai_api
from ktrans_server.errors import APIError, unauthorized
from ktrans_server.service import Service, Settings

log = logging.getLogger("ktrans.server")
PUBLIC_PATHS = {"/health", "/", "/api/version"}


def _key_ok(request: Request, key: str) -> bool:
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def create_app(settings: Settings, load_engine: Callable[[], Any]) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.ensure_future(_load(service, load_engine))
        try:
            yield
        finally:
            task.cancel()
            if service.engine is not None and hasattr(service.engine, "shutdown"):
                await service.engine.shutdown()

    app = FastAPI(title="ktrans", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if settings.api_key and request.method != "OPTIONS" and request.url.path not in PUBLIC_PATHS:
            if not _key_ok(request, settings.api_key):
                service.count("responses_401")
                return unauthorized().response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return APIError(400, f"Invalid request: {e.errors()}").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"No route {request.method} {request.url.path}" if e.status_code == 404 else str(e.detail)
        return APIError(e.status_code, msg, type=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"Internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.get("/health")
    async def health():
        if service.load_error:
            return APIError(503, f"Model failed to load: {service.load_error}", type="unavailable_error").response()
        if not service.ready:
            return APIError(503, "Loading model", type="unavailable_error").response()
        return {"status": "ok", **{k: v for k, v in service.engine.stats().items()
                                   if isinstance(v, (int, float, str))}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(service), media_type="text/plain; version=0.0.4")

    app.include_router(openai_api.router(service))
    app.include_router(ollama_api.router(service))
    return app


async def _load(service: Service, load_engine: Callable[[], Any]) -> None:
    try:
        engine = await asyncio.to_thread(load_engine)
        if hasattr(engine, "start"):
            await engine.start()
        service.engine = engine
        log.info("model ready: %s (context %d tokens)", service.names()[0], engine.max_context)
    except Exception as e:  # reported by /health; the process stays up to say why
        service.load_error = f"{type(e).__name__}: {e}"
        log.error("model failed to load: %s", service.load_error)
