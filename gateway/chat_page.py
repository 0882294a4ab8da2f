"""tandem's own chat page: static HTML, CSS and JS modules (gateway/static/chat) served at `/chat`, and at `/`
for a browser; every other client of `/` keeps Ollama's `Ollama is running`."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from gateway.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static" / "chat"
PAGE = STATIC / "index.html"

# Set here rather than guessed: `mimetypes` reads the host's tables, and a module script served as
# text/plain (as some hosts map .mjs) is refused by the browser.
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# A second wall behind DOMPurify: nothing inline runs, nothing loads from elsewhere (an image in a model's
# answer cannot carry the conversation off to another host), the page cannot be framed.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded tandem serves its new page at once
}

Endpoint = Callable[[Request], Awaitable[Response]]


def prefers_html(accept: str) -> bool:
    """Whether `Accept` names HTML at a quality no other type beats: what a browser sends when it opens a
    page. `*/*` alone (curl, httpx), `application/json` (the Ollama and OpenAI SDKs) and no header say no."""
    html, other = 0.0, 0.0
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media.lower() in ("text/html", "application/xhtml+xml"):
            html = max(html, quality)
        elif media:
            other = max(other, quality)
    return html > 0 and html >= other


def wants_page(scope: Scope) -> bool:
    """A browser opening `/`: it gets the page, which auth lets through so that the page can ask for a key."""
    if scope["type"] != "http" or scope["path"] != "/" or scope["method"] not in ("GET", "HEAD"):
        return False
    accept = next((v for k, v in scope["headers"] if k == b"accept"), b"").decode("latin-1")
    return prefers_html(accept)


def opens_without_key(scope: Scope) -> bool:
    """What auth lets through: the page and its files (GET/HEAD of /chat…; `POST /chat` is seed 003's API and
    needs the key), and the page at `/` for a browser."""
    if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
        return False
    path = scope["path"]
    return path in ("/chat", "/chat/") or path.startswith("/chat/assets/") or wants_page(scope)


def find_assets(root: Path) -> dict[str, Path]:
    """Every servable file under `root` by its URL name; only these names are served, so no path from a
    request ever reaches the file system."""
    return {
        path.relative_to(root).as_posix(): path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


ASSETS = find_assets(STATIC)


def file_response(request: Request, path: Path, media_type: str, headers: dict[str, str]) -> Response:
    response = FileResponse(path, media_type=media_type, headers=headers, stat_result=os.stat(path))
    if request.headers.get("if-none-match") == response.headers["etag"]:
        return Response(status_code=304, headers={"etag": response.headers["etag"], **headers})
    return response


async def page(request: Request) -> Response:
    response = file_response(request, PAGE, "text/html; charset=utf-8", PAGE_HEADERS)
    response.headers["Vary"] = "Accept"
    return response


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"No chat page asset {name!r}")
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return file_response(request, path, MEDIA_TYPES[path.suffix], headers)


def front_door(other: Endpoint) -> Endpoint:
    """`/`: the page for a browser, `other` for everyone else; `Vary: Accept` keeps caches from mixing them."""

    async def root(request: Request) -> Response:
        response = await page(request) if wants_page(request.scope) else await other(request)
        response.headers["Vary"] = "Accept"
        return response

    return root


def routes(root: Endpoint) -> list[BaseRoute]:
    """The page at `/chat`, its files under `/chat/assets/`, and `/` shared with `root` (Ollama's)."""
    return [
        Route("/", front_door(root), methods=["GET", "HEAD"]),
        Route("/chat", page, methods=["GET", "HEAD"]),
        Route("/chat/assets/{name:path}", asset, methods=["GET", "HEAD"]),
    ]
