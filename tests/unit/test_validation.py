"""Bad input at the boundary, in both dialects: every number range-checked to what the worker can take, invalid
UTF-8 and malformed tools refused with a 400 naming the field, and any bug a 500 in the dialect's JSON shape with
the request id (mid-stream: one error event) — never plain text, never a stream cut without a word."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fake_pool import ScriptedPool, Step

from common.protocol import Delta, Done, Generate, ModelCard, Usage, encode
from gateway.app import create_app
from gateway.config import GatewayConfig

pytestmark = pytest.mark.anyio

CARD = ModelCard(name="m", context_length=2048, vocab_size=49152)
HI = [{"role": "user", "content": "hi"}]
ANSWER: list[Step] = [Delta(id=0, text="ok"), Done(id=0, finish_reason="stop", usage=Usage(3, 1))]
HUGE = 2**70


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Exploding(ScriptedPool):
    """A pool with a bug: it raises what a GatewayError is not, before the first event or after it."""

    def __init__(self, after_first: bool) -> None:
        super().__init__(CARD, ANSWER)
        self.after_first = after_first

    async def generate(self, request: Generate, keep_alive: float | None = None) -> AsyncIterator[Delta | Done]:
        if self.after_first:
            yield Delta(id=0, text="partial")
        raise RuntimeError("a bug")


@contextlib.asynccontextmanager
async def client_for(pool: ScriptedPool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # as a server would: answer the 500
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


def openai_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


def ollama_error(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"18446744073709551616": 1}}, "logit_bias"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),  # one past this model's vocabulary
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"seed": HUGE}, "seed"),
        ({"seed": -HUGE}, "seed"),
        ({"stop_token_ids": [HUGE]}, "stop_token_ids[0]"),
        ({"stop_token_ids": [50_000]}, "stop_token_ids"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": "all of them"}, "tools"),
    ],
)
async def test_openai_out_of_range_and_malformed_fields_are_400_naming_them(fields: dict[str, Any], param: str) -> None:
    pool = ScriptedPool(CARD, ANSWER)
    async with client_for(pool) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": HI, **fields})
    assert response.status_code == 400, response.text
    assert openai_error(response)["param"] == param
    assert pool.requests == []  # refused before anything reached a worker


@pytest.mark.parametrize(
    "options, field",
    [
        ({"seed": HUGE}, "seed"),
        ({"repeat_penalty": 1e300}, "repeat_penalty"),
        ({"stop": ["x"] * 65}, "stop"),
    ],
)
async def test_ollama_out_of_range_options_are_400_naming_them(options: dict[str, Any], field: str) -> None:
    pool = ScriptedPool(CARD, ANSWER)
    async with client_for(pool) as client:
        body = {"model": "m", "messages": HI, "stream": False, "options": options}
        response = await client.post("/api/chat", json=body)
    assert response.status_code == 400, response.text
    assert field in ollama_error(response)
    response_tools = {"model": "m", "messages": HI, "tools": [{"type": "function"}]}
    async with client_for(pool) as client:
        refused = await client.post("/api/chat", json=response_tools)
    assert refused.status_code == 400 and "tools" in ollama_error(refused)


async def test_limits_past_the_context_mean_up_to_the_context_in_both_dialects() -> None:
    pool = ScriptedPool(CARD, ANSWER)
    async with client_for(pool) as client:
        chat = await client.post("/v1/chat/completions", json={"model": "m", "messages": HI, "max_tokens": HUGE})
        legacy = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": HUGE, "n": 2,
                                                             "seed": 2**63 - 1, "top_k": HUGE})  # fmt: skip
        ollama = await client.post(
            "/api/chat", json={"model": "m", "messages": HI, "stream": False, "options": {"num_predict": HUGE}}
        )
    assert (chat.status_code, legacy.status_code, ollama.status_code) == (200, 200, 200)
    assert {r.params.max_tokens for r in pool.requests} == {CARD.context_length}
    seeds = [r.params.seed for r in pool.requests if r.prompt is not None]
    assert seeds == [2**63 - 1, -(2**63)]  # n=2 from the largest seed: the second wraps around, still int64
    assert all(encode(r) for r in pool.requests)  # everything sent fits the wire


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_invalid_utf8_is_a_400(path: str) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    async with client_for(ScriptedPool(CARD, ANSWER)) as client:
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    message = openai_error(response)["message"] if path.startswith("/v1") else ollama_error(response)
    assert "UTF-8" in message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_bug_before_the_answer_is_a_500_in_the_dialect_shape_with_the_request_id(path: str) -> None:
    async with client_for(Exploding(after_first=False)) as client:
        response = await client.post(
            path, json={"model": "m", "messages": HI, "stream": False}, headers={"x-request-id": "req-42"}
        )
    assert response.status_code == 500 and response.headers["x-request-id"] == "req-42"
    message = openai_error(response)["message"] if path.startswith("/v1") else ollama_error(response)
    assert "req-42" in message and "RuntimeError" in message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_bug_mid_stream_ends_the_stream_with_an_error_event(path: str) -> None:
    async with client_for(Exploding(after_first=True)) as client:
        response = await client.post(
            path, json={"model": "m", "messages": HI, "stream": True}, headers={"x-request-id": "req-43"}
        )
    assert response.status_code == 200
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.strip()]
    last = json.loads(lines[-1])
    error = last["error"]["message"] if path.startswith("/v1") else last["error"]
    assert "req-43" in error and "partial" in response.text
