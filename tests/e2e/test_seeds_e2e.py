"""The seed services' APIs on the real model: every request example of their documents, sent unchanged, and the seeds'
own client code (002's `requests` call, a `QwenClient` reading 000's SSE stream with sseclient-py).

The servers cap the seed routes at a few output tokens (conftest.SEED_MAX_TOKENS), so the documents' 512-token
examples finish quickly; what is checked is the documented fields and types, never the sampled text. Seed 004's
examples (the Ollama and OpenAI routes) name a model this server does not serve and set no output limit: their
shapes are checked in the unit tests, the routes themselves in the dialect end-to-end tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests
import sseclient

from tests.e2e.conftest import Server
from tests.seed_examples import EXAMPLES, Example, check_answer

pytestmark = pytest.mark.e2e

THINKING_ROUTES = {"/thinking"}  # need a model whose template thinks


def answer_of(example: Example, response: httpx.Response) -> Any:
    if example.path == "/api/v1/chat/stream":
        return [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n") if line]
    return response.json()


def send(base_url: str, example: Example) -> tuple[Example, httpx.Response]:
    # GET / answers Ollama's text to the seed's plain curl; a client asks for JSON (or the server runs --root-json)
    headers = {"Accept": "application/json"} if example.path == "/" and example.method == "GET" else {}
    if example.body is None:
        return example, httpx.request(example.method, base_url + example.path, headers=headers, timeout=120)
    return example, httpx.request(example.method, base_url + example.path, json=example.body, timeout=120)


def test_every_documented_example_on_the_real_model(server: Server, thinking_server: Server) -> None:
    examples = [e for e in EXAMPLES if e.seed != "004"]
    with ThreadPoolExecutor(max_workers=16) as pool:  # at once, as their clients would: the engine batches them
        answered = list(
            pool.map(lambda e: send((thinking_server if e.path in THINKING_ROUTES else server).base_url, e), examples)
        )
    for example, response in answered:
        assert response.status_code == 200, (example.name, response.text)
        if example.path == "/api/v1/chat/stream":
            events = answer_of(example, response)
            assert [events[0]["type"], events[-1]["type"]] == ["start", "end"], example.name
            assert {e["type"] for e in events[1:-1]} == {"chunk"} and all(isinstance(e["content"], str) for e in events)
        else:
            check_answer(example, answer_of(example, response))


def test_seed_002_client_code_unchanged(server: Server) -> None:
    """The seed's own `get_completion`, with its URL pointed at tandem."""

    def get_completion(prompt: str) -> str:
        headers = {"Content-Type": "application/json"}
        data = {"prompt": prompt, "history": []}
        response = requests.post(url=server.base_url, headers=headers, data=json.dumps(data))
        return response.json()["response"]  # type: ignore[no-any-return]

    assert isinstance(get_completion("你好"), str)


class QwenClient:
    """The seed 000 document's client API (`chat`, `chat_stream`), reading its SSE with sseclient-py as the seed did."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def chat(self, message: str, history: list[dict[str, str]] | None = None) -> str:
        body = {"message": message, "history": history or []}
        response = requests.post(f"{self.base_url}/api/v1/chat", json=body, timeout=120)
        response.raise_for_status()
        data = response.json()
        assert data["success"] is True and data["error"] is None
        return data["response"]  # type: ignore[no-any-return]

    def chat_stream(self, message: str, history: list[dict[str, str]] | None = None) -> Iterator[dict[str, Any]]:
        body = {"message": message, "history": history or []}
        response = requests.post(f"{self.base_url}/api/v1/chat/stream", json=body, stream=True, timeout=120)
        response.raise_for_status()
        for event in sseclient.SSEClient(response).events():  # type: ignore[arg-type]
            yield json.loads(event.data)


def test_seed_000_client_streams_the_thinking_live(thinking_server: Server) -> None:
    client = QwenClient(thinking_server.base_url)
    events = list(client.chat_stream("请解释一下人工智能"))
    assert events[0] == {"type": "start", "content": ""} and events[-1] == {"type": "end", "content": ""}
    streamed = "".join(e["content"] for e in events if e.get("type") == "chunk")
    assert streamed.startswith("<think>\n") and "</think>" in streamed  # tagged, as the seed's streamer wrote it
    reply = client.chat("你好", history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert "<think>" not in reply and "</think>" not in reply


def test_max_length_counts_the_prompt_as_transformers_does(server: Server) -> None:
    def generate(max_length: int) -> httpx.Response:
        body = {"prompt": "Tell me about Paris.", "max_length": max_length, "do_sample": False}
        return httpx.post(f"{server.base_url}/generate", json=body, timeout=60)

    prompt_tokens = generate(200).json()["usage"]["prompt_tokens"]
    three_more = generate(prompt_tokens + 3).json()["usage"]
    assert (three_more["prompt_tokens"], three_more["completion_tokens"]) == (prompt_tokens, 3)
    full = generate(prompt_tokens)
    assert full.status_code == 400 and "max_length" in full.json()["detail"]


def test_thinking_answers_with_reasoning_and_a_confidence(thinking_server: Server, server: Server) -> None:
    body = {"question": "What is 2 + 2?", "thinking_depth": 1, "include_reasoning": True}
    answer = httpx.post(f"{thinking_server.base_url}/thinking", json=body, timeout=60).json()
    assert answer["reasoning"] and isinstance(answer["answer"], str) and answer["thinking_budget"] == 8
    assert 0 < answer["confidence"] <= 1 if answer["answer"] else answer["confidence"] == 0
    plain = httpx.post(f"{server.base_url}/thinking", json=body, timeout=60)  # SmolLM2's own template cannot think
    assert plain.status_code == 400 and "does not support thinking" in plain.json()["detail"]


def test_thinking_budget_closes_the_thinking_and_leaves_room_for_an_answer(thinking_server: Server) -> None:
    """8 thinking tokens at depth 1, then the worker closes the think block: an answer with a confidence. (Greedy on
    this server: a question the model would think about far past the budget, where the answer comes only because
    the budget closed the thinking.)"""
    body = {"question": "Write a long story about a dragon.", "thinking_depth": 1}
    answer = httpx.post(f"{thinking_server.base_url}/thinking", json=body, timeout=60).json()
    assert answer["thinking_budget"] == 8 and answer["reasoning"] and "</think>" not in answer["reasoning"]
    assert answer["answer"] and 0 < answer["confidence"] <= 1


def test_invalid_bodies_are_422_and_info_comes_from_the_worker(server: Server) -> None:
    missing = httpx.post(f"{server.base_url}/api/v1/chat", json={"history": []}, timeout=10)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "message"]
    out_of_range = httpx.post(f"{server.base_url}/chat", json={"messages": [], "temperature": 5}, timeout=10)
    assert out_of_range.status_code == 422 and isinstance(out_of_range.json()["detail"], list)
    info = httpx.get(f"{server.base_url}/api/v1/model/info", timeout=10).json()
    health = httpx.get(f"{server.base_url}/health", timeout=10).json()
    # the chat model's worker (an earlier module may have loaded the embedding model on this shared server too)
    [worker] = [w for w in health["workers"] if info["model_name"] in w["models"]]
    assert info["device"] == worker["device"] and info["model_size"] > 0
    assert health["memory"]["used_bytes"] > 0 and health["memory"]["total_bytes"] > health["memory"]["used_bytes"]
    loaded = httpx.post(f"{server.base_url}/api/v1/model/load", timeout=10)
    assert loaded.json() == {"status": "loaded", "message": f"Model {info['model_name']} is loaded"}
