"""`GET /` for every kind of client: Ollama's "Ollama is running" by default (its clients and scripts probe it),
seed 003's service description as JSON to a client that asks for JSON, or to everyone with --root-json."""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from gateway.llamafactory import service_info
from gateway.streaming import JSONBody


def root_kind(accept: str, root_json: bool) -> Literal["json", "text"]:
    """The one place that decides what `GET /` answers, from the Accept header and the gateway's flag."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if "application/json" in types or (root_json and "text/plain" not in types):
        return "json"
    return "text"


async def root(request: Request) -> Response:
    if root_kind(request.headers.get("accept", ""), request.app.state.config.root_json) == "json":
        return JSONBody(service_info(request))
    return PlainTextResponse("Ollama is running")
