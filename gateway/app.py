"""The Starlette app: dialect routes, health, metrics, the middleware stack, one error-handler map, and the
worker pool in the lifespan."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.control import Placement
from common.curve import CurveKeys
from common.protocol import ModelCard
from gateway import (
    chat_page,
    embeddings,
    llamafactory,
    lora_adapters,
    ollama,
    ollama_models,
    openai,
    openapi,
    qwen3_service,
    qwen_chat,
    router_info,
    seeds,
    thinking_service,
)
from gateway.auth import HEALTH_PATHS, METRICS_PATHS, RequireKey, is_open, open_paths
from gateway.config import GatewayConfig
from gateway.discovery import Discovery, DnsDiscovery
from gateway.errors import GatewayError, NotFound, Unavailable
from gateway.metrics import Metrics, metrics_endpoint
from gateway.observe import REQUEST_ID, Observe
from gateway.root import root
from gateway.stats import stats_endpoint
from gateway.streaming import internal_error
from gateway.workers import WorkerConnection, WorkerPool

logger = logging.getLogger(__name__)


SEED_DIALECTS = (qwen3_service, thinking_service, qwen_chat, llamafactory)  # the seed services' APIs, one module each


def seed_routes() -> list[BaseRoute]:
    return [route for dialect in SEED_DIALECTS for route in dialect.routes()]


# Where errors take FastAPI's {"detail"} shape. `/` is Ollama's for GET and seed 002's for POST: told by the method.
SEED_PATHS = frozenset(str(getattr(route, "path", "")) for route in seed_routes()) - {"/"}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def render_error(path: str, exc: GatewayError, method: str = "GET") -> Response:
    if is_openai_path(path):
        return openai.render_error(exc)
    if path in SEED_PATHS or (method, path) == ("POST", "/"):
        return seeds.render_error(exc)
    return ollama.render_error(exc)


async def render_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return render_error(request.url.path, exc, request.method)


async def render_unexpected(request: Request, exc: Exception) -> Response:
    """Any other exception is a bug: a 500 in the dialect's shape naming the request id (the traceback is
    logged by Starlette's error middleware, which calls this), never plain text."""
    request_id = request.headers.get(REQUEST_ID)  # set by Observe, whose context has ended by now
    response = render_error(request.url.path, internal_error(exc, request_id))
    if request_id:
        response.headers[REQUEST_ID] = request_id
    return response


async def render_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the dialect's shape (an SDK parses every error body)."""
    assert isinstance(exc, HTTPException)
    error = GatewayError(exc.detail or "error")
    error.status = exc.status_code
    error.type = "invalid_request_error"
    if exc.status_code == 404:
        error = NotFound(f"No route for {request.method} {request.url.path}")
    return await render_gateway_error(request, error)


# -- health -------------------------------------------------------------------------------------


def worker_view(worker: WorkerConnection) -> dict[str, Any]:
    info = worker.info
    kv_usage = info.kv_blocks_used / info.kv_blocks_total if info and info.kv_blocks_total else 0.0
    return {
        "address": worker.address,
        "ready": worker.is_ready,
        "models": [m.name for m in info.models] if info else [],
        "device": info.device if info else None,
        "pid": info.pid if info else None,
        "up_since": info.started_at if info else None,
        "uptime_s": round(time.time() - info.started_at, 3) if info else None,
        "running": info.num_running if info else 0,
        "waiting": info.num_waiting if info else 0,
        "kv_cache_usage": round(kv_usage, 4),
        "accelerators": info.num_accelerators if info else 0,
        "memory_used_bytes": info.memory_used_bytes if info else 0,
        "memory_total_bytes": info.memory_total_bytes if info else 0,
        "prefix_cache_hit_rate": round(info.prefix_cache_hit_rate, 4) if info else 0.0,
        "in_flight": worker.num_in_flight,
        "restarts": worker.restarts,
        "draining": worker.draining,
    }


def placement_view(card: ModelCard, placement: Placement | None) -> dict[str, Any]:
    return {
        "model": card.name,
        "addresses": placement.addresses if placement else None,
        "expires_at": placement.expires_at if placement else None,
        "size": placement.size if placement else None,
    }


async def ready(request: Request) -> Response:
    """Readiness (`/health`, `/health/ready`): 200 once a worker answers, 503 before and while draining.

    Also every field the seed services documented for their /health: seed 003's `model_loaded`, `model_name`,
    seed 001's `gpu_available` and `memory`, and their `status: "healthy"`."""
    state = request.app.state
    pool: WorkerPool = state.pool
    status = "draining" if state.draining else "healthy" if pool.is_ready else "starting"
    models = pool.models() if pool.is_ready else []
    model_loaded = bool(models) and seeds.worker_info(request, models[0]) is not None  # listed is not loaded (registry)
    infos = [w.info for w in pool.workers if w.info is not None]
    body = {
        "status": status,
        "gateway_pid": os.getpid(),  # which of several gateway processes (launcher --gateways N) answered
        "model_loaded": model_loaded,
        "model_name": models[0].name if models else None,
        "gpu_available": any(info.num_accelerators for info in infos),
        "memory": {
            "used_bytes": sum(info.memory_used_bytes for info in infos),
            "total_bytes": sum(info.memory_total_bytes for info in infos),
        },
        "uptime_s": round(time.time() - state.started_at, 3),
        "workers": [worker_view(w) for w in pool.workers],
        "loaded": [placement_view(card, placement) for card, placement in pool.loaded()],
        # what each discovery source (--worker-dns, --worker-ray) saw last
        "discovery": pool.discovered(),
    }
    return JSONResponse(body, status_code=200 if status == "healthy" else 503)


async def live(request: Request) -> Response:
    """Liveness: the process serves HTTP. Stays 200 while draining, so nothing kills it mid-drain."""
    return JSONResponse({"status": "draining" if request.app.state.draining else "alive"})


# -- draining -----------------------------------------------------------------------------------


class DrainGate:
    """After SIGTERM (`app.state.draining`, set by gateway.__main__.Server) a new request gets 503 in its
    dialect's shape and `Connection: close`; requests already in flight are not touched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        draining = scope["type"] == "http" and scope["app"].state.draining
        if not draining or is_open(path, HEALTH_PATHS + METRICS_PATHS):
            await self.app(scope, receive, send)
            return
        error = Unavailable(
            "The server is shutting down; retry shortly", headers={"Retry-After": "1", "Connection": "close"}
        )
        await render_error(path, error, scope.get("method", "GET"))(scope, receive, send)


def discovery_sources(config: GatewayConfig) -> list[Discovery]:
    sources: list[Discovery] = [DnsDiscovery(target) for target in config.worker_dns]
    if config.worker_ray is not None:
        from gateway.ray_discovery import RayDiscovery  # only with --worker-ray: it needs the ray package

        sources.append(RayDiscovery(config.worker_ray, config.ray_namespace))
    return sources


def create_app(config: GatewayConfig, pool: WorkerPool | None = None) -> Starlette:
    """The whole HTTP surface. `pool` is injectable for tests; by default built from config.workers."""
    metrics = Metrics(config.metrics_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        curve = None
        if config.curve_server_key and config.curve_client_key:
            curve = CurveKeys.load(config.curve_server_key, config.curve_client_key)
        app.state.pool = pool or WorkerPool(
            list(config.workers),
            metrics=metrics,
            max_in_flight=config.max_in_flight,
            curve=curve,
            buffer_bytes=config.buffer_bytes,
            registry=config.registry,
            discovery=discovery_sources(config),
            discovery_interval=config.discovery_interval,
            routing=config.routing,
        )
        app.state.config = config
        app.state.metrics = metrics
        app.state.started_at = time.time()
        await app.state.pool.start()
        try:
            yield
        finally:
            await app.state.pool.close()

    routes = [
        Route("/health", ready, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/stats", stats_endpoint, methods=["GET"]),
        *openai.routes(),
        *lora_adapters.routes(),
        *ollama.routes(),
        *ollama_models.routes(),
        *embeddings.routes(),
        *router_info.routes(),
        *chat_page.routes(root=root),
        *seed_routes(),
        *openapi.routes(),
    ]
    # Outermost first. CORS outside everything, so refusals carry its headers too and a browser can read them.
    middleware = [Middleware(Observe, metrics=metrics, routes=routes), Middleware(DrainGate)]
    if config.cors_origins:
        cors = Middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID],
        )
        middleware.insert(0, cors)
    if config.api_keys:
        paths = open_paths(protect_health=config.protect_health, protect_metrics=config.protect_metrics)
        middleware.append(
            Middleware(
                RequireKey,
                keys=config.api_keys,
                open_paths=paths,
                open_request=chat_page.opens_without_key,
                render=render_error,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: render_gateway_error,
            HTTPException: render_http_exception,
            Exception: render_unexpected,
        },
    )
    app.state.draining = False
    return app
