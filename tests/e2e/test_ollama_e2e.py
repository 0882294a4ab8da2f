"""The Ollama dialect, driven by the official `ollama` client and raw httpx NDJSON streams, on the real model."""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import ollama
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
FINAL_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.base_url)


@pytest.fixture(scope="module")
def model(client: ollama.Client) -> str:
    return str(client.list().models[0].model)


def test_root_version_and_tags(server: Server, client: ollama.Client, model: str) -> None:
    root = httpx.get(server.base_url + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert httpx.head(server.base_url + "/").status_code == 200
    assert httpx.get(server.base_url + "/api/version").json()["version"]
    assert model.lower().startswith("smollm2-135m-instruct")


def test_chat_not_streamed(client: ollama.Client, model: str) -> None:
    response = client.chat(model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 40})
    assert response.message.role == "assistant"
    assert "Paris" in (response.message.content or "")
    assert response.done is True and response.done_reason == "stop"
    for field in FINAL_FIELDS:
        value = getattr(response, field)
        assert isinstance(value, int) and value >= 0, field
    assert response.eval_count and response.prompt_eval_count and response.prompt_eval_count > 10
    # As in Ollama, only a request that waited for the model to load reports it; the model is loaded by now.
    again = client.chat(model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 2})
    assert again.load_duration == 0


def test_chat_streams_ndjson_by_default(server: Server, model: str) -> None:
    body = {"model": model, "messages": QUESTION, "options": {"temperature": 0, "num_predict": 30}}
    with httpx.stream("POST", f"{server.base_url}/api/chat", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) > 2
    assert all(line["done"] is False for line in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
    for field in FINAL_FIELDS:
        assert isinstance(final[field], int), field
    datetime.fromisoformat(final["created_at"].replace("Z", "+00:00"))  # RFC 3339
    text = "".join(line["message"]["content"] for line in lines)
    assert "Paris" in text


def test_streamed_client_chat_matches_unstreamed(client: ollama.Client, model: str) -> None:
    options = {"temperature": 0, "num_predict": 25}
    whole = client.chat(model=model, messages=QUESTION, options=options)
    parts = list(client.chat(model=model, messages=QUESTION, options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count


def test_options_num_predict_stop_seed(client: ollama.Client, model: str) -> None:
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    short = client.chat(model=model, messages=story, options={"num_predict": 6, "temperature": 0})
    assert short.done_reason == "length" and short.eval_count == 6
    free = client.chat(model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 40})
    text = free.message.content or ""
    stopped = client.chat(
        model=model, messages=QUESTION, options={"temperature": 0, "num_predict": 40, "stop": ["Paris"]}
    )
    assert stopped.message.content == text[: text.index("Paris")]
    seeded = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7, "num_predict": 20}
    first = client.chat(model=model, messages=story, options=seeded).message.content
    assert first == client.chat(model=model, messages=story, options=seeded).message.content


def test_model_name_with_latest_tag(client: ollama.Client, model: str) -> None:
    name = model.removesuffix(":latest") + ":latest"
    response = client.chat(model=name, messages=QUESTION, options={"num_predict": 3})
    assert response.done
