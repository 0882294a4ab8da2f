"""Per-request bookkeeping as pure ASGI middleware: a request id on every answer, HTTP counters, one log line.

The middleware opens a `Trace` for each request and puts it in a context variable; the pool's meter
(gateway/metrics.py) fills in model, tokens, TTFT and finish reason as the generation runs, and the
middleware logs the whole story once the response has been sent.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.metrics import Metrics

logger = logging.getLogger(__name__)

REQUEST_ID = "x-request-id"
# Polled all day by probes and scrapers, or fetched by the dozen with each chat page: DEBUG, not INFO.
QUIET_PATHS = ("/health", "/metrics", "/stats", "/chat/assets/")
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other is labelled `other`


def dialect_of(path: str) -> str:
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path == "/" or path.startswith("/api/"):
        return "ollama"
    if path == "/chat" or path.startswith("/chat/"):
        return "page"
    return "ops"


@dataclass
class Trace:
    """One HTTP request's story, filled in as it goes. Token counts add up over its generations (OpenAI `n`)."""

    request_id: str
    dialect: str
    method: str
    path: str
    started: float  # perf_counter
    status: int = 0
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None  # seconds to the first delta of the earliest generation
    finish_reason: str = ""
    error: str = ""

    def fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "dialect": self.dialect,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "model": self.model or None,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.ttft is None else round(self.ttft, 4),
            "total_s": round(time.perf_counter() - self.started, 4),
            "finish_reason": self.finish_reason or None,
            "error": self.error or None,
        }


current_trace: ContextVar[Trace | None] = ContextVar("tandem_trace", default=None)


def endpoint_label(routes: list[BaseRoute], scope: Scope) -> str:
    """The route's path template (`/v1/models/{model:path}`), so the label set stays small; else `other`."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return str(getattr(route, "path", "other"))
    return "other"


class Observe:
    """Outermost but CORS: sees every answer, the auth and drain refusals included."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _take_request_id(scope)
        trace = Trace(request_id, dialect_of(scope["path"]), scope["method"], scope["path"], time.perf_counter())
        endpoint = endpoint_label(self.routes, scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                trace.status = message["status"]
                headers = MutableHeaders(scope=message)
                if REQUEST_ID not in headers:  # openai.py sets the same id itself
                    headers[REQUEST_ID] = request_id
            await send(message)

        token = current_trace.set(trace)
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            trace.error = trace.error or type(exc).__name__
            trace.status = trace.status or 500  # ServerErrorMiddleware, outside us, answers 500
            raise
        finally:
            current_trace.reset(token)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(endpoint, method, str(trace.status)).inc()
            _log(trace)


def _take_request_id(scope: Scope) -> str:
    """The client's x-request-id (cut to 200 characters) or a new one, written back into the request headers
    so that endpoints which read it (openai.py) answer with the same id."""
    headers = [(k, v) for k, v in scope["headers"] if k != REQUEST_ID.encode()]
    given = next((v for k, v in scope["headers"] if k == REQUEST_ID.encode()), b"").decode("latin-1")[:200]
    request_id = given or uuid.uuid4().hex
    scope["headers"] = [*headers, (REQUEST_ID.encode(), request_id.encode("latin-1"))]
    return request_id


def _log(trace: Trace) -> None:
    fields = trace.fields()
    level = logging.DEBUG if trace.path.startswith(QUIET_PATHS) else logging.INFO
    parts = [f"{key}={value}" for key, value in fields.items() if key not in ("request_id", "method", "path")]
    logger.log(
        level,
        "request %s: %s %s %s",
        trace.request_id,
        trace.method,
        trace.path,
        " ".join(p for p in parts if not p.endswith("=None")),
        extra=fields,
    )
