"""The Starlette app: dialect routes, health, one error-handler map, and the worker pool in the lifespan."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import ollama, openai
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, NotFound
from gateway.workers import WorkerPool

logger = logging.getLogger(__name__)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


async def render_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    if is_openai_path(request.url.path):
        return openai.render_error(exc)
    return ollama.render_error(exc)


async def render_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the dialect's shape (an SDK parses every error body)."""
    assert isinstance(exc, HTTPException)
    error = GatewayError(exc.detail or "error")
    error.status = exc.status_code
    error.type = "invalid_request_error"
    if exc.status_code == 404:
        error = NotFound(f"No route for {request.method} {request.url.path}")
    return await render_gateway_error(request, error)


async def health(request: Request) -> Response:
    pool: WorkerPool = request.app.state.pool
    workers = [
        {
            "address": w.address,
            "ready": w.is_ready,
            "models": [m.name for m in w.info.models] if w.info else [],
            "device": w.info.device if w.info else None,
            "pid": w.info.pid if w.info else None,
            "up_since": w.info.started_at if w.info else None,
            "running": w.info.num_running if w.info else 0,
            "waiting": w.info.num_waiting if w.info else 0,
            "kv_cache_usage": round(w.info.kv_blocks_used / w.info.kv_blocks_total, 4)
            if w.info and w.info.kv_blocks_total
            else 0.0,
            "in_flight": w.num_in_flight,
        }
        for w in pool.workers
    ]
    body = {
        "status": "ok" if pool.is_ready else "starting",
        "uptime_s": round(time.time() - request.app.state.started_at, 3),
        "workers": workers,
    }
    return JSONResponse(body, status_code=200 if pool.is_ready else 503)


def create_app(config: GatewayConfig, pool: WorkerPool | None = None) -> Starlette:
    """The whole HTTP surface. `pool` is injectable for tests; by default built from config.workers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.pool = pool or WorkerPool(list(config.workers))
        app.state.config = config
        app.state.started_at = time.time()
        await app.state.pool.start()
        try:
            yield
        finally:
            await app.state.pool.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        *openai.routes(),
        *ollama.routes(),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={GatewayError: render_gateway_error, HTTPException: render_http_exception},
    )
