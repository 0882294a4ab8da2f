"""Continuous batching on the real model: many concurrent streams with mixed settings, batch-independent
greedy output, and admission limits that answer at once instead of queueing forever."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

TOPICS = ["a cat", "the sea", "a robot", "winter", "a train", "music", "a garden", "the moon"]


def chat_body(model: str, topic: str, **settings: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write two sentences about {topic}."}],
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
        **settings,
    }


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(text, finish_reason, usage) of one streamed OpenAI chat completion."""
    text, finish, usage = "", "", {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return text, finish, usage


def model_of(server: Server) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]


def test_sixteen_concurrent_streams_with_mixed_sampling(server: Server) -> None:
    model = model_of(server)
    settings: list[dict[str, Any]] = [
        {"temperature": 0},
        {"temperature": 0.7, "top_p": 0.9, "seed": 1},
        {"temperature": 1.0, "top_k": 20, "seed": 2},
        {"temperature": 0.8, "min_p": 0.1, "seed": 3},
        {"temperature": 0.9, "presence_penalty": 1.0, "frequency_penalty": 0.5, "seed": 4},
        {"temperature": 0, "repetition_penalty": 1.3},
        {"temperature": 0, "max_tokens": 5},
        {"temperature": 0, "stop": ["."]},
    ]
    bodies = [chat_body(model, TOPICS[i % 8], **settings[i % 8]) for i in range(16)]

    async def run() -> list[tuple[str, str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return await asyncio.gather(*(stream_chat(client, body) for body in bodies))

    results = asyncio.run(run())
    for body, (text, finish, usage) in zip(bodies, results, strict=True):
        assert text, body
        assert finish in ("stop", "length"), body
        assert 0 < usage["completion_tokens"] <= body["max_tokens"]
        if body.get("max_tokens") == 5:
            assert finish == "length" and usage["completion_tokens"] == 5
        if body.get("stop"):
            assert "." not in text

    # Seeded and greedy requests are reproducible even though their batch neighbours differ this time.
    async def again() -> list[tuple[str, str, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return await asyncio.gather(*(stream_chat(client, body) for body in bodies[:8]))

    assert [r[0] for r in asyncio.run(again())] == [r[0] for r in results[:8]]


def test_greedy_output_alone_equals_output_inside_a_full_batch(server: Server) -> None:
    model = model_of(server)
    probe = chat_body(model, "a lighthouse", temperature=0, max_tokens=32)

    async def alone() -> str:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return (await stream_chat(client, probe))[0]

    async def in_batch() -> str:
        others = [chat_body(model, TOPICS[i % 8], temperature=0.8, seed=i, max_tokens=48) for i in range(15)]
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            results = await asyncio.gather(*(stream_chat(client, b) for b in [*others[:7], probe, *others[7:]]))
        return results[7][0]

    assert asyncio.run(in_batch()) == asyncio.run(alone())


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Room for one running and one waiting request, so the third is over the limit."""
    server = start_server(
        tmp_path_factory.mktemp("limits"), "--worker-arg=--max-running=1", "--worker-arg=--max-waiting=1"
    )
    yield server
    assert server.stop() == 0, server.log()


def test_over_the_limit_is_refused_at_once_in_each_dialect(tiny_server: Server) -> None:
    model = model_of(tiny_server)
    long = chat_body(model, "a dragon", max_tokens=400, ignore_eos=True)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as client:
            holders = [asyncio.create_task(stream_chat(client, long)) for _ in range(2)]
            deadline = time.monotonic() + 30
            while sum(w["in_flight"] for w in (await client.get("/health")).json()["workers"]) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            refused = await client.post("/v1/chat/completions", json={**long, "stream": False})
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"]
            assert refused.json()["error"]["type"]
            ollama = await client.post(
                "/api/chat", json={"model": model, "messages": long["messages"], "stream": False}
            )
            assert ollama.status_code == 503 and ollama.json() == {"error": "server busy, please try again"}
            # Refused at once, not after queueing: both holders (400 tokens each) are still streaming.
            assert not any(holder.done() for holder in holders)
            for holder in holders:
                holder.cancel()
            await asyncio.gather(*holders, return_exceptions=True)

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while tiny_server.health().json()["workers"][0]["running"] != 0:  # cancelled streams freed their slots
        assert time.monotonic() < deadline
        time.sleep(0.1)
