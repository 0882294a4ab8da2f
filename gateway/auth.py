"""Optional API keys: `Authorization: Bearer <key>` on both dialects' routes, compared in constant time.

Health and metrics stay open by default (probes and scrapers rarely carry secrets); flags close them too.
The chat page and its files are always open (gateway.chat_page.opens_without_key): they hold no secret, and the
page must load to ask for a key.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, Unauthorized

HEALTH_PATHS = ("/health",)  # and everything under it: /health/live, /health/ready
METRICS_PATHS = ("/metrics", "/stats")
DOCS_PATHS = ("/openapi.json", "/docs", "/redoc")  # always open: the API's description, not the API


def read_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and `#` comments are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return keys


def open_paths(*, protect_health: bool, protect_metrics: bool) -> tuple[str, ...]:
    return DOCS_PATHS + (() if protect_health else HEALTH_PATHS) + (() if protect_metrics else METRICS_PATHS)


def is_open(path: str, paths: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in paths)


def matches_a_key(authorization: str, keys: Iterable[bytes]) -> bool:
    scheme, _, token = authorization.strip().partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    found = False
    for key in keys:  # every key, every time: how long this takes says nothing about which key came close
        found |= hmac.compare_digest(given, key)
    return found and bool(given)


class RequireKey:
    """Pure ASGI: a request without a valid key ends here with 401 in its dialect's shape. `open_request` lets
    through what a path alone cannot tell apart: a browser opening `/` (the chat page) from an Ollama client."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Iterable[str],
        open_paths: tuple[str, ...],
        render: Callable[[str, GatewayError], Response],
        open_request: Callable[[Scope], bool] = lambda scope: False,
    ) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = open_paths
        self.render = render
        self.open_request = open_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.keys
            or is_open(scope["path"], self.open_paths)
            or self.open_request(scope)
        ):
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        if matches_a_key(authorization, self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "Invalid API key"
            if authorization
            else "Missing API key: send it in the header 'Authorization: Bearer <key>'"
        )
        error = Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
        await self.render(scope["path"], error)(scope, receive, send)
