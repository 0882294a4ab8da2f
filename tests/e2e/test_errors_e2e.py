"""Every error a client can cause comes back in its dialect's shape, with the right status, never a 500."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest

from tests.e2e.conftest import ROOT, Server, free_port

pytestmark = pytest.mark.e2e

HI = [{"role": "user", "content": "hi"}]


def openai_error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def ollama_error(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def test_unknown_model_is_404_in_both_dialects(server: Server) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": "nope", "messages": HI})
    assert response.status_code == 404
    assert "nope" in openai_error(response)["message"]
    response = httpx.post(f"{server.base_url}/api/chat", json={"model": "nope", "messages": HI})
    assert response.status_code == 404
    assert ollama_error(response) == "model 'nope' not found"
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=server.base_url).chat(model="nope", messages=HI)
    assert caught.value.status_code == 404


def test_malformed_json_is_400(server: Server) -> None:
    for path, check in (("/v1/chat/completions", openai_error), ("/api/chat", ollama_error)):
        response = httpx.post(
            server.base_url + path, content=b'{"model": ', headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        check(response)


def test_invalid_field_names_the_field(server: Server) -> None:
    model = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]
    cases = [
        {"model": model, "messages": HI, "temperature": "hot"},
        {"model": model, "messages": HI, "temperature": 7},
        {"model": model, "messages": "hi"},
        {"model": model},
        {"model": model, "messages": HI, "max_tokens": -1},
    ]
    for body in cases:
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body)
        assert response.status_code in (400, 422), (body, response.text)
        error = openai_error(response)
        bad_field = next(k for k in ("temperature", "messages", "max_tokens") if k in error["message"])
        assert bad_field, error
    response = httpx.post(
        f"{server.base_url}/api/chat", json={"model": model, "messages": HI, "options": {"temperature": "hot"}}
    )
    assert response.status_code == 400 and "temperature" in ollama_error(response)


def test_prompt_longer_than_the_context_is_400(server: Server) -> None:
    model = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]
    huge = [{"role": "user", "content": "hello " * 9000}]
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": model, "messages": huge}, timeout=60)
    assert response.status_code == 400
    assert "context length" in openai_error(response)["message"]
    response = httpx.post(
        f"{server.base_url}/api/chat", json={"model": model, "messages": huge, "stream": False}, timeout=60
    )
    assert response.status_code == 400 and "context length" in ollama_error(response)


def test_unknown_route_is_404_in_dialect_shape(server: Server) -> None:
    response = httpx.get(f"{server.base_url}/v1/nothing-here")
    assert response.status_code == 404
    openai_error(response)


def test_no_worker_is_503_then_health_says_not_ready() -> None:
    port = free_port()
    address = f"ipc:///tmp/tandem-test-absent-{port}.sock"
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--port", str(port), "--worker", address],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/health")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert health.status_code == 503
        response = httpx.post(f"{base}/v1/chat/completions", json={"model": "any", "messages": HI})
        assert response.status_code == 503
        openai_error(response)
        response = httpx.post(f"{base}/api/chat", json={"model": "any", "messages": HI})
        assert response.status_code == 503
        ollama_error(response)
    finally:
        gateway.terminate()
        assert gateway.wait(30) == 0
