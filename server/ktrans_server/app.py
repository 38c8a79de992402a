"""The FastAPI application: routes, the request guard (hosts, origins, API key, limits), CORS, error shapes, health
and metrics.

`create_app(settings, load_engine, on_load_failed)` returns an app that starts loading the engine
in a background thread at start-up; until it is ready /health answers 503 and generation routes
503 with "Loading model", so orchestrators and clients can wait instead of failing. If loading
fails, `on_load_failed(message)` is called (`ktrans serve` then exits non-zero with the message:
clients retry 503s, so a server that can never become ready must not keep answering them).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ktrans_server import metrics, ollama_api, openai_api
from ktrans_server.errors import APIError, render_error
from ktrans_server.http_guard import ClientGone, Guard
from ktrans_server.service import Service, Settings

log = logging.getLogger("ktrans.server")


def create_app(settings: Settings, load_engine: Callable[[], Any],
               on_load_failed: Callable[[str], None] | None = None) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.ensure_future(_load(service, load_engine, on_load_failed))
        try:
            yield
        finally:
            task.cancel()
            if service.engine is not None and hasattr(service.engine, "shutdown"):
                await service.engine.shutdown()

    app = FastAPI(title="ktrans", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)
    # Added last, so it runs first: refusals and status counts cover every response.
    app.add_middleware(Guard, limits=settings.limits, count=service.count)

    _error_handlers(app)

    @app.get("/health")
    async def health():
        if service.load_error:
            return APIError(503, f"Model failed to load: {service.load_error}", type="unavailable_error").response()
        if not service.ready:
            return APIError(503, "Loading model", type="unavailable_error", code="model_loading",
                            headers={"Retry-After": "5"}).response()
        return {"status": "ok", **{k: v for k, v in service.engine.stats().items()
                                   if isinstance(v, (int, float, str))}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(service), media_type="text/plain; version=0.0.4")

    app.include_router(openai_api.router(service))
    app.include_router(ollama_api.router(service))
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return render_error(request.url.path, e)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        # The client closed the connection mid-upload: nobody is left to answer (499, nginx's
        # "client closed request"), and nothing went wrong on our side worth a traceback.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return render_error(request.url.path, APIError(400, f"Invalid request: {e.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = APIError(404, f"No route {request.method} {request.url.path}", type="not_found_error")
        elif e.status_code == 405:
            err = APIError(405, f"{request.url.path} does not accept {request.method}.",
                           headers=dict(e.headers or {}))
        else:
            err = APIError(e.status_code, str(e.detail))
        return render_error(request.url.path, err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return render_error(request.url.path, APIError(500, f"Internal error: {type(e).__name__}: {e}",
                                                       type="server_error"))


async def _load(service: Service, load_engine: Callable[[], Any],
                on_load_failed: Callable[[str], None] | None) -> None:
    try:
        engine = await asyncio.to_thread(load_engine)
        if hasattr(engine, "start"):
            await engine.start()
        await asyncio.to_thread(service.attach, engine)
        log.info("model ready: %s (context %d tokens)", service.names()[0], engine.max_context)
    except Exception as e:
        service.load_error = f"{type(e).__name__}: {e}"
        log.error("model failed to load: %s", service.load_error)
        if on_load_failed is not None:
            on_load_failed(service.load_error)
