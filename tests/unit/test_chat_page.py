"""The chat page's serving, without a browser: `/` for browsers and for everyone else, the assets and their
types, nothing from another host, auth letting the page (and only the page) through, the vendored files."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fake_pool import ScriptedPool
from starlette.testclient import TestClient

from common.protocol import ModelCard
from gateway.app import create_app
from gateway.chat_page import ASSETS, PAGE, STATIC, prefers_html
from gateway.config import GatewayConfig

CHROME = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8"
FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
VENDOR = STATIC / "vendor"
KEY = "sk-page"


def client(**config: Any) -> Iterator[TestClient]:
    pool = ScriptedPool(ModelCard(name="m", context_length=64), [])
    app = create_app(GatewayConfig(workers=(), **config), pool=pool)  # type: ignore[arg-type]
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def gateway() -> Iterator[TestClient]:
    yield from client()


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    yield from client(api_keys=(KEY,))


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (CHROME, True),
        (FIREFOX, True),
        ("text/html", True),
        ("application/json, text/html", True),  # a tie goes to the page
        ("*/*", False),  # curl, httpx
        ("", False),  # no header
        ("application/json", False),  # the Ollama and OpenAI SDKs
        ("application/json, text/html;q=0.5", False),
        ("text/html;q=0", False),
        ("text/html;q=oops, */*", False),  # an unreadable quality counts as 0
    ],
)
def test_prefers_html(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


def test_root_is_the_page_for_a_browser_and_ollamas_answer_for_everyone_else(gateway: TestClient) -> None:
    browser = gateway.get("/", headers={"accept": CHROME})
    assert browser.status_code == 200 and browser.headers["content-type"] == "text/html; charset=utf-8"
    assert browser.text == PAGE.read_text() and browser.headers["vary"] == "Accept"
    csp = browser.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    for accept in ("*/*", None):
        headers = {"accept": accept} if accept else {}
        other = gateway.get("/", headers=headers)
        assert (other.status_code, other.text, other.headers["vary"]) == (200, "Ollama is running", "Accept")
        head = gateway.head("/", headers=headers)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/plain")
    described = gateway.get("/", headers={"accept": "application/json"})  # seed 003's service description
    assert described.json()["docs"] == "/docs" and described.headers["vary"] == "Accept"
    head = gateway.head("/", headers={"accept": CHROME})
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and not head.content


def test_chat_path_serves_the_page_and_revalidates(gateway: TestClient) -> None:
    page = gateway.get("/chat")
    assert page.status_code == 200 and page.text == PAGE.read_text()
    assert page.headers["content-security-policy"] and page.headers["x-content-type-options"] == "nosniff"
    again = gateway.get("/chat", headers={"if-none-match": page.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert gateway.get("/chat/", follow_redirects=True).text == page.text


def referenced_assets() -> set[str]:
    """Every asset the page names (index.html) and every module the JS files import, as served names."""
    names = {href.removeprefix("chat/assets/") for href in re.findall(r'(?:src|href)="([^"]+)"', PAGE.read_text())}
    names.discard("data:,")  # the empty favicon
    for module in [name for name in ASSETS if name.endswith((".js", ".mjs"))]:
        folder = module.rpartition("/")[0]
        for target in re.findall(r'^import .* from "\./([^"]+)";$', ASSETS[module].read_text(), re.M):
            names.add(f"{folder}/{target}".lstrip("/"))
    return names


def test_every_asset_the_page_needs_is_served_with_its_type(gateway: TestClient) -> None:
    names = referenced_assets()
    assert {"app.js", "theme.js", "style.css", "vendor/dompurify/purify.es.mjs"} <= names
    for name in names:
        response = gateway.get(f"/chat/assets/{name}")
        assert response.status_code == 200, name
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        assert response.headers["content-type"] == f"{kind}; charset=utf-8", name
        assert response.headers["x-content-type-options"] == "nosniff"


def test_the_page_loads_nothing_from_another_host() -> None:
    html = PAGE.read_text()
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)
    for name in ("app.js", "api.js", "store.js", "view.js", "markdown.js"):
        source = ASSETS[name].read_text()
        assert not re.search(r"https?://", source), name
        assert all(target.startswith("./") for target in re.findall(r'from "([^"]+)"', source)), name


@pytest.mark.parametrize(
    "path", ["/chat/assets/nope.js", "/chat/assets/%2e%2e/%2e%2e/chat_page.py", "/chat/assets/vendor/manifest.json"]
)
def test_only_the_listed_assets_are_served(gateway: TestClient, path: str) -> None:
    assert gateway.get(path).status_code == 404


def test_with_api_keys_the_page_loads_without_one_and_nothing_else_does(keyed: TestClient) -> None:
    assert keyed.get("/chat").status_code == 200
    assert keyed.get("/chat/assets/app.js").status_code == 200
    assert keyed.get("/", headers={"accept": CHROME}).status_code == 200
    assert keyed.get("/", headers={"accept": "application/json"}).status_code == 401  # an Ollama client
    assert keyed.post("/", headers={"accept": CHROME}).status_code == 401  # only GET/HEAD open the page
    assert keyed.get("/v1/models", headers={"accept": CHROME}).status_code == 401
    models = keyed.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "m"


def test_vendored_files_are_the_npm_releases_named_in_the_manifest() -> None:
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    listed: set[str] = set()
    for package in manifest["packages"]:
        assert package["version"] and package["license"] and package["integrity"].startswith("sha512-")
        assert any(name.endswith("/LICENSE") for name in package["files"]), package["name"]
        for name, entry in package["files"].items():
            listed.add(name)
            if "sha256" in entry:
                assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == entry["sha256"], name
    on_disk = {p.relative_to(VENDOR).as_posix() for p in VENDOR.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json", "README.md"} == listed
