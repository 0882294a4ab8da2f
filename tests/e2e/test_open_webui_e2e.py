"""What Open WebUI sends, replayed against the real server on both of its connections: the model menu, a chat with
its built-in tools on a model whose template cannot take them, the background title/tags/follow-up tasks that set
no output limit, document search embeddings, and the admin's unload, pull and refused model routes.

(Open WebUI itself is a multi-GB install; the README says how to point it at tandem.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

CHAT = "SmolLM2-135M-Instruct"
EMBEDDING = "all-MiniLM-L6-v2"
CAP = 24  # the server's --default-max-tokens here: an open-ended request stops there (2048 by default)
# Open WebUI's built-in tools ride on every chat it sends (36 of them); three of their shapes stand for them here.
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": parameters}}
    for name, parameters in (
        ("search_web", {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
        ("get_current_time", {"type": "object", "properties": {}}),
        ("query_knowledge_files", {"type": "object", "properties": {"query": {"type": "string"}, "count": {}}}),
    )
]
TITLE_TASK = (
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
    "### Chat History:\n<chat_history>\nUSER: Why is the sky blue?\nASSISTANT: Rayleigh scattering.\n</chat_history>"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("open-webui"),
        f"--gateway-arg=--default-max-tokens={CAP}",
        "--worker-arg=--kv-cache-bytes=268435456",
    )
    yield server
    assert server.stop() == 0, server.log()


def test_the_model_menu_and_details(server: Server) -> None:
    url = server.base_url
    assert httpx.get(f"{url}/api/version").json()["version"]
    tags = {m["name"]: m for m in httpx.get(f"{url}/api/tags").json()["models"]}
    assert {f"{CHAT}:latest", f"{EMBEDDING}:latest"} <= set(tags)
    models = {m["id"] for m in httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer any"}).json()["data"]}
    assert CHAT in models
    shown = httpx.post(f"{url}/api/show", json={"model": f"{CHAT}:latest"}).json()
    assert shown["capabilities"] == ["completion"] and shown["template"]


def test_a_chat_with_its_tools_streams_an_answer_on_the_ollama_connection(server: Server) -> None:
    body = {
        "model": f"{CHAT}:latest",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "tools": TOOLS,
        "stream": True,
        "options": {"temperature": 0},
    }
    with httpx.stream("POST", f"{server.base_url}/api/chat", json=body, timeout=120) as response:
        assert response.status_code == 200 and "tools ignored" in response.headers["warning"]
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in lines).strip()
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] <= CAP  # no limit set: the server's cap


def test_the_same_chat_on_the_openai_connection(server: Server) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "tools": TOOLS,
        "stream": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    url = f"{server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers={"authorization": "Bearer any"}, timeout=120) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] <= CAP


@pytest.mark.parametrize("task", ["title", "tags", "follow-ups"])
def test_background_tasks_without_a_limit_end_at_the_servers_cap(server: Server, task: str) -> None:
    body = {"model": f"{CHAT}:latest", "messages": [{"role": "user", "content": f"{TITLE_TASK}\n({task})"}],
            "stream": False}  # fmt: skip
    answer = httpx.post(f"{server.base_url}/api/chat", json=body, timeout=120).json()
    assert answer["done"] and answer["eval_count"] <= CAP and answer["done_reason"] in ("stop", "length")


def test_document_search_embeddings(server: Server) -> None:
    body = {"model": f"{EMBEDDING}:latest", "input": ["First chunk of a document.", "Second chunk."], "truncate": True}
    answer = httpx.post(f"{server.base_url}/api/embed", json=body, timeout=120).json()
    assert len(answer["embeddings"]) == 2 and len(answer["embeddings"][0]) == 384


def test_the_admin_unloads_pulls_and_is_told_what_tandem_does_instead(server: Server) -> None:
    url = server.base_url
    httpx.post(f"{url}/api/generate", json={"model": f"{CHAT}:latest", "prompt": ""}, timeout=120)  # loaded
    assert f"{CHAT}:latest" in names(httpx.get(f"{url}/api/ps").json())
    unloaded = httpx.post(f"{url}/api/generate", json={"model": f"{CHAT}:latest", "prompt": "", "keep_alive": 0})
    assert unloaded.json()["done_reason"] == "unload"
    assert f"{CHAT}:latest" not in names(httpx.get(f"{url}/api/ps").json())  # the loaded-state dot goes out
    pulled = httpx.post(f"{url}/api/pull", json={"model": f"{CHAT}:latest", "insecure": True}, timeout=30)
    assert [json.loads(line) for line in pulled.text.splitlines()][-1] == {"status": "success"}
    for method, path in (("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/create"),
                         ("POST", "/api/push")):  # fmt: skip
        refused = httpx.request(method, f"{url}{path}", json={"model": CHAT, "source": CHAT, "destination": "x"})
        assert refused.status_code >= 400 and "tandem" in refused.json()["error"]


def names(ps: dict[str, Any]) -> set[str]:
    return {m["name"] for m in ps["models"]}
