"""API keys on both dialects (401 in each one's shape), open or closed health and metrics, and CORS."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import openai
import pytest
from test_ops_harness import MODEL, chat, tandem

from gateway.auth import matches_a_key, read_key_file

KEYS = ("sk-first", "sk-second")


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_openai_routes_need_a_key_and_refuse_in_openai_shape() -> None:
    with tandem(api_keys=KEYS) as (gateway, engine):
        url = f"{gateway.base_url}/v1/chat/completions"
        missing = httpx.post(url, json=chat())
        wrong = httpx.post(url, json=chat(), headers=bearer("sk-third"))
        not_bearer = httpx.post(url, json=chat(), headers={"authorization": "sk-first"})
        models = httpx.get(f"{gateway.base_url}/v1/models")
        ok = httpx.post(url, json=chat(), headers=bearer("sk-second"))
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {
        "error": {
            "message": "Missing API key: send it in the header 'Authorization: Bearer <key>'",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Invalid API key"
    assert not_bearer.status_code == 401 and models.status_code == 401
    assert "x-request-id" in missing.headers
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert len(engine.received) == 1  # refused requests never reach the worker


def test_ollama_routes_take_the_same_header_and_refuse_in_ollama_shape() -> None:
    with tandem(api_keys=KEYS) as (gateway, _):
        missing = httpx.post(f"{gateway.base_url}/api/chat", json=chat())
        tags = httpx.get(f"{gateway.base_url}/api/tags", headers=bearer("nope"))
        ok = httpx.post(f"{gateway.base_url}/api/chat", json=chat(), headers=bearer("sk-first"))
    assert missing.status_code == 401
    assert missing.json() == {"error": "Missing API key: send it in the header 'Authorization: Bearer <key>'"}
    assert tags.status_code == 401 and tags.json() == {"error": "Invalid API key"}
    assert ok.status_code == 200 and ok.json()["done"] is True


def test_official_clients_with_and_without_the_key() -> None:
    with tandem(api_keys=KEYS) as (gateway, _):
        good = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="sk-first", max_retries=0)
        bad = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="sk-wrong", max_retries=0)
        answer = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        reply = ollama.Client(host=gateway.base_url, headers=bearer("sk-second")).chat(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=gateway.base_url).chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content and reply.message.content
    assert refused.value.status_code == 401


@pytest.mark.parametrize(
    ("flags", "closed"),
    [
        ({}, []),
        ({"protect_health": True}, ["/health", "/health/live", "/health/ready"]),
        ({"protect_metrics": True}, ["/metrics", "/stats"]),
    ],
)
def test_health_and_metrics_stay_open_unless_a_flag_closes_them(flags: dict[str, bool], closed: list[str]) -> None:
    with tandem(api_keys=KEYS, **flags) as (gateway, _):
        paths = ["/health", "/health/live", "/health/ready", "/metrics", "/stats"]
        statuses = {path: httpx.get(gateway.base_url + path).status_code for path in paths}
        with_key = {path: httpx.get(gateway.base_url + path, headers=bearer("sk-first")).status_code for path in paths}
    assert {path for path, status in statuses.items() if status == 401} == set(closed)
    assert set(with_key.values()) == {200}


def test_key_matching_and_key_files(tmp_path: Path) -> None:
    keys = [key.encode() for key in KEYS]
    assert matches_a_key("Bearer sk-first", keys) and matches_a_key("bearer  sk-second ", keys)
    assert not matches_a_key("Bearer sk-firs", keys) and not matches_a_key("Basic sk-first", keys)
    assert not matches_a_key("Bearer ", keys) and not matches_a_key("", [b""])
    path = tmp_path / "keys"
    path.write_text("# team A\nsk-a\n\n  sk-b  \n")
    assert read_key_file(path) == ["sk-a", "sk-b"]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no API key"):
        read_key_file(path)


def test_cors_is_off_by_default_and_configurable() -> None:
    origin = {"origin": "https://chat.example"}
    with tandem() as (gateway, _):
        plain = httpx.get(f"{gateway.base_url}/v1/models", headers=origin)
    with tandem(cors_origins=("https://chat.example",), api_keys=KEYS) as (gateway, _):
        asks = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        preflight = httpx.options(f"{gateway.base_url}/v1/chat/completions", headers={**origin, **asks})
        refused = httpx.get(f"{gateway.base_url}/v1/models", headers=origin)
        other = httpx.get(f"{gateway.base_url}/v1/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in plain.headers
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    # a browser can read the 401 (and the request id) too
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://chat.example"
    assert "x-request-id" in refused.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in other.headers
