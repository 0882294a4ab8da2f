"""The OpenAPI document: valid OpenAPI 3.1, every route in it, every request example (the README's and the seed
documents') valid against it, every real answer of the routes valid against it; Swagger UI and ReDoc offline."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec
from starlette.routing import Mount, Route
from test_seeds import CARD, FakePool, client_for

from common.protocol import Delta, Done, Usage
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.openapi import ASSETS, document
from tests.seed_examples import EXAMPLES

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = document("0.9.1")
UNDOCUMENTED = {"/openapi.json", "/docs", "/redoc", "/chat/assets/{name:path}"}  # the description itself, as
# FastAPI leaves them out, and the chat page's static files


def schema(pointer: dict[str, Any]) -> dict[str, Any]:
    """A schema from the document, with the components its $refs point to."""
    return {**pointer, "components": DOCUMENT["components"]}


def request_schema(method: str, path: str) -> dict[str, Any]:
    body = DOCUMENT["paths"][path][method.lower()]["requestBody"]
    return schema(body["content"]["application/json"]["schema"])


def answer_schema(method: str, path: str, status: str = "200") -> dict[str, Any]:
    responses = DOCUMENT["paths"][path][method.lower()]["responses"]
    return schema(responses.get(status, responses.get("default"))["content"]["application/json"]["schema"])


def test_the_document_is_valid_openapi_3_1() -> None:
    validate_spec(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


def test_every_route_is_in_the_document() -> None:
    app = create_app(GatewayConfig(workers=()))
    served = {
        (method.lower(), route.path.replace("{model:path}", "{model}"))
        for route in app.routes
        if isinstance(route, Route) and route.path not in UNDOCUMENTED
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(method, path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert served == documented
    assert any(isinstance(route, Mount) and route.path == ASSETS for route in app.routes)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.body is not None], ids=lambda e: e.name)
def test_every_seed_request_example_is_valid(example: Any) -> None:
    jsonschema.validate(example.body, request_schema(example.method, example.path))


def readme_examples() -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of every `curl … /path … -d '{…}'` in the README."""
    text = (ROOT / "README.md").read_text()
    found = []
    for command in re.findall(r"curl .*?(?=\n```|\ncurl )", text, re.S):
        url = re.search(r"https?://[^/\s]+(/[^\s'\"]*)", command)
        data = re.search(r"-d '(.*?)'", command, re.S)
        if url and data:
            found.append((url.group(1), json.loads(data.group(1))))
    return found


def test_readme_request_examples_are_valid() -> None:
    examples = readme_examples()
    assert {path for path, _ in examples} >= {"/v1/chat/completions", "/api/chat", "/api/v1/chat", "/thinking", "/"}
    for path, body in examples:
        jsonschema.validate(body, request_schema("POST", path))


# -- real answers -------------------------------------------------------------------------------

ANSWER = [
    Delta(id=0, reasoning="hm"),
    Delta(id=0, text="Hel"),
    Delta(id=0, text="lo"),
    Done(id=0, finish_reason="stop", usage=Usage(3, 2)),
]
CALLS = [
    ("POST", "/v1/chat/completions", {"model": CARD.name, "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"model": CARD.name, "prompt": "hi", "logprobs": 1}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{CARD.name}", None),
    ("POST", "/api/chat", {"model": CARD.name, "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/api/generate", {"model": CARD.name, "prompt": "hi", "stream": False}),
    ("POST", "/api/show", {"model": CARD.name}),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/api/version", None),
    ("GET", "/health", None),
    ("GET", "/health/live", None),
    ("GET", "/stats", None),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/chat", {"messages": []}),
] + [(e.method, e.path, e.body) for e in EXAMPLES if e.seed != "004" and not e.path.endswith("/stream")]


async def test_every_answer_fits_the_document() -> None:
    async with client_for(FakePool(ANSWER), root_json=True) as client:
        for method, path, body in CALLS:
            response = await client.request(method, path, json=body)
            documented = path if path in DOCUMENT["paths"] else "/v1/models/{model}"
            status = "200" if response.status_code == 200 else "default"
            jsonschema.validate(response.json(), answer_schema(method, documented, status))


async def test_swagger_ui_and_redoc_are_served_offline() -> None:
    async with client_for(FakePool()) as client:
        pages = [(await client.get(path)).text for path in ("/docs", "/redoc")]
        assets = re.findall(r'(?:src|href)="([^"]+)"', "".join(pages))
        fetched = [await client.get(asset) for asset in assets]
        spec = await client.get("/openapi.json")
    assert len(assets) == 3 and all(asset.startswith(ASSETS) for asset in assets)  # nothing from a CDN
    assert all(r.status_code == 200 and len(r.content) > 10_000 for r in fetched)
    assert spec.json() == DOCUMENT


async def test_docs_stay_open_when_the_api_needs_a_key() -> None:
    app = create_app(GatewayConfig(workers=(), api_keys=("k",)), pool=FakePool())  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
            assert (await client.get("/docs")).status_code == 200
            assert (await client.get("/openapi.json")).status_code == 200
            assert (await client.post("/chat", json={})).status_code == 401
