"""The seed services' APIs without a model: every request example of their documents against a scripted pool, the
translations into Generate, FastAPI's error shapes, and the routes they share with tandem (/health, /stats, GET /)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
from fake_pool import ScriptedPool, Step

from common.protocol import ChatMessage, Delta, Done, Generate, Logprob, ModelCard, SamplingParams, Usage, WorkerInfo
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import ContextLengthExceeded, InternalError
from tests.seed_examples import (
    EXAMPLES,
    SEED_DOCS,
    Example,
    check_answer,
    examples_in_documents,
    same_up_to_mojibake,
)

pytestmark = pytest.mark.anyio

CARD = ModelCard(
    name="Qwen3-4B-Thinking",
    context_length=4096,
    architecture="qwen3",
    size_bytes=8_044_000_000,
    capabilities=["completion", "thinking"],
    family="qwen3",
    format="safetensors",
    source="/models/Qwen3-4B-Thinking",
)
INFO = WorkerInfo(
    instance="a",
    pid=7,
    models=[CARD],
    device="cuda:1",
    started_at=0.0,
    max_running=8,
    max_waiting=8,
    num_accelerators=2,
    memory_used_bytes=9_000_000_000,
    memory_total_bytes=80_000_000_000,
)


def done(prompt: int = 5, completion: int = 2) -> Done:
    return Done(id=0, finish_reason="stop", usage=Usage(prompt, completion))


def logprob(value: float) -> list[Logprob]:
    return [Logprob("t", value, None, [])]


# The thinking tokens' probabilities must not count toward /thinking's confidence: only the answer's (-0.1, -0.3).
THOUGHT: list[Step] = [
    Delta(id=0, reasoning="Think", logprobs=logprob(-5.0)),
    Delta(id=0, logprobs=logprob(-4.0)),  # </think>: neither text nor reasoning
    Delta(id=0, text="Hel", logprobs=logprob(-0.1)),
    Delta(id=0, text="lo", logprobs=logprob(-0.3)),
    done(),
]


@dataclass
class FakeWorker:
    """What /health and the info routes read of a WorkerConnection."""

    info: WorkerInfo | None = INFO
    address: str = "ipc:///tmp/fake"
    num_in_flight: int = 0
    restarts: int = 0
    draining: bool = False

    @property
    def is_ready(self) -> bool:
        return self.info is not None


class FakePool(ScriptedPool):
    def __init__(self, script: Callable[[Generate], list[Step]] | list[Step] = THOUGHT, card: ModelCard = CARD):
        super().__init__(card, script)
        self.workers = [FakeWorker(info=msgspec.structs.replace(INFO, models=[card]))]


@contextlib.asynccontextmanager
async def client_for(pool: FakePool, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(workers=(), version="0.9.1", **config), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


def sse_events(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [
        line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line.removeprefix("data: "))
        for line in response.text.split("\n\n")
        if line
    ]


# -- every example of the seed documents --------------------------------------------------------


def test_the_examples_are_every_curl_example_of_the_documents() -> None:
    if not SEED_DOCS.is_dir():
        pytest.skip(f"the seed documents are not beside the repository ({SEED_DOCS})")
    documented = examples_in_documents()
    assert len(documented) >= len(EXAMPLES)
    for seed, method, path, text in documented:
        body = json.loads(text) if text else None
        assert any(
            (e.seed, e.method, e.path) == (seed, method, path) and same_up_to_mojibake(body, e.body) for e in EXAMPLES
        ), (seed, method, path, text)


async def send(client: httpx.AsyncClient, example: Example) -> httpx.Response:
    if example.body is None:
        return await client.request(example.method, example.path)
    return await client.request(example.method, example.path, json=example.body)


def answer_of(example: Example, response: httpx.Response) -> Any:
    """The answer as the seed's client reads it: JSON, or the SSE stream's events, or Ollama's last line."""
    if example.path == "/api/v1/chat/stream":
        return sse_events(response)
    if example.path == "/api/chat" and not example.body.get("stream", True):  # type: ignore[union-attr]
        return response.json()
    if example.path == "/api/chat":
        return json.loads(response.text.strip().split("\n")[-1])  # Ollama streams unless told not to
    return response.json()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
async def test_every_documented_example_answers_its_documented_fields(example: Example) -> None:
    card = CARD if example.seed != "004" else ModelCard(name="Qwen/Qwen1.5-0.5B", context_length=4096)
    async with client_for(FakePool(card=card), root_json=True) as client:
        response = await send(client, example)
    assert response.status_code == 200, response.text
    answer = answer_of(example, response)
    if example.path == "/api/v1/chat/stream":
        assert [event["type"] for event in answer] == ["start", "chunk", "chunk", "chunk", "end"]
        assert "".join(event["content"] for event in answer) == "<think>\nThink\n</think>\n\nHello"
        return
    check_answer(example, answer)


async def test_seed_002_python_client_and_history() -> None:
    """The seed's own `requests` call, through httpx here (same body, same headers)."""
    async with client_for(FakePool()) as client:
        headers = {"Content-Type": "application/json"}
        data = {"prompt": "你好", "history": [["hi", "hello"]]}
        response = await client.post("/", headers=headers, content=json.dumps(data))
    assert response.json()["response"] == "Hello"
    assert response.json()["history"] == [["hi", "hello"], ["你好", "Hello"]]


# -- translations -------------------------------------------------------------------------------


async def sent_for(method: str, path: str, body: Any, **config: Any) -> Generate:
    pool = FakePool()
    async with client_for(pool, **config) as client:
        response = await client.request(method, path, json=body)
    assert response.status_code == 200, response.text
    return pool.requests[0]


async def test_002_defaults_are_the_seeds_and_max_length_counts_the_prompt() -> None:
    sent = await sent_for("POST", "/", {"prompt": "你好", "history": [["a", "b"]]})
    assert sent.params == SamplingParams(temperature=0.95, top_p=0.7, max_total_tokens=2048)
    assert sent.messages == [
        ChatMessage(role="user", content="a"),
        ChatMessage(role="assistant", content="b"),
        ChatMessage(role="user", content="你好"),
    ]
    greedy = await sent_for("POST", "/", {"prompt": "x", "temperature": 0, "top_p": 0.5, "max_length": 64})
    assert greedy.params == SamplingParams(temperature=0.0, top_p=0.5, max_total_tokens=64)


async def test_001_generate_max_length_and_do_sample() -> None:
    sent = await sent_for("POST", "/generate", {"prompt": "p", "max_length": 200, "temperature": 0.7})
    assert sent.params == SamplingParams(temperature=0.7, top_p=0.9, max_total_tokens=200)
    assert sent.messages == [ChatMessage(role="user", content="p")]
    greedy = await sent_for("POST", "/generate", {"prompt": "p", "do_sample": False, "max_tokens": 9})
    assert greedy.params == SamplingParams(temperature=0.0, top_p=0.9, max_tokens=9)


async def test_003_chat_passes_the_system_turn_and_defaults() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    sent = await sent_for("POST", "/chat", {"messages": messages})
    assert sent.messages == [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    assert sent.params == SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)


async def test_seed_max_tokens_caps_every_seed_route() -> None:
    capped = await sent_for("POST", "/chat", {"messages": [{"role": "user", "content": "u"}]}, seed_max_tokens=16)
    assert capped.params.max_tokens == 16
    unlimited = await sent_for("POST", "/api/v1/chat", {"message": "m"}, seed_max_tokens=16)
    assert unlimited.params == SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_tokens=16)


async def test_thinking_runs_with_thinking_on_a_budget_and_a_confidence() -> None:
    pool = FakePool()
    async with client_for(pool) as client:
        body = {"question": "RSA?", "thinking_depth": 2, "include_reasoning": True}
        answer = (await client.post("/thinking", json=body)).json()
        without = (await client.post("/thinking", json={**body, "include_reasoning": False})).json()
    sent = pool.requests[0]
    assert sent.think is True and sent.params.thinking_budget == 512 and sent.params.logprobs == 0
    assert sent.params.max_tokens == 512 + 1024
    assert (answer["answer"], answer["reasoning"], without["reasoning"]) == ("Hello", "Think", None)
    assert answer["confidence"] == round(math.exp((-0.1 - 0.3) / 2), 4)  # geometric mean over the answer only
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


async def test_under_seed_max_tokens_the_thinking_budget_leaves_half_for_the_answer() -> None:
    sent = await sent_for("POST", "/thinking", {"question": "q", "thinking_depth": 5}, seed_max_tokens=16)
    assert (sent.params.thinking_budget, sent.params.max_tokens) == (8, 16)


async def test_thinking_without_an_answer_has_confidence_zero() -> None:
    async with client_for(FakePool([Delta(id=0, reasoning="hm", logprobs=logprob(-1.0)), done()])) as client:
        answer = (await client.post("/thinking", json={"question": "q"})).json()
    assert (answer["answer"], answer["confidence"], answer["thinking_depth"]) == ("", 0.0, 3)


async def test_thinking_needs_a_thinking_model() -> None:
    plain = ModelCard(name="SmolLM2", context_length=8192, capabilities=["completion"])
    async with client_for(FakePool(card=plain)) as client:
        response = await client.post("/thinking", json={"question": "q"})
    assert response.status_code == 400 and response.json() == {
        "detail": "The model 'SmolLM2' does not support thinking"
    }


# -- batches are one batch ----------------------------------------------------------------------


def echo(request: Generate) -> str:
    return request.prompt or (request.messages or [ChatMessage(role="user")])[0].content


class BarrierPool(FakePool):
    """Holds every request's answer until `size` requests are in: a route that sent them one at a time would
    never get its first answer."""

    def __init__(self, size: int) -> None:
        super().__init__(lambda request: [Delta(id=0, text=echo(request)), done()])
        self.size = size
        self.started = 0
        self.all_in = asyncio.Event()

    async def generate(self, request: Generate, keep_alive: float | None = None) -> AsyncIterator[Delta | Done]:
        self.started += 1
        if self.started == self.size:
            self.all_in.set()
        await self.all_in.wait()
        async for event in super().generate(request):
            yield event


@pytest.mark.parametrize("path", ["/batch", "/batch_generate"])
async def test_batch_routes_send_every_prompt_at_once(path: str) -> None:
    pool = BarrierPool(size=4)
    async with client_for(pool) as client:
        response = await asyncio.wait_for(client.post(path, json={"prompts": ["a", "b", "c", "d"]}), 10)
    assert response.status_code == 200 and len(pool.requests) == 4
    results = response.json()["results"]
    assert [r if isinstance(r, str) else r["generated_text"] for r in results] == ["a", "b", "c", "d"]  # in order


async def test_batch_generate_holds_at_most_ten() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post("/batch_generate", json={"prompts": ["p"] * 11})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompts"]


# -- errors in FastAPI's shape ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        ("/api/v1/chat", {"history": []}, {"type": "missing", "loc": ["body", "message"], "msg": "Field required"}),
        ("/", {"prompt": "x", "history": [["only one"]]}, {"type": "value_error", "loc": ["body", "history", 0]}),
        ("/chat", {"messages": [{"role": "robot", "content": "x"}]}, {"loc": ["body", "messages", 0, "role"]}),
        ("/generate", {"prompt": "x", "temperature": 3}, {"loc": ["body", "temperature"]}),
        ("/thinking", {"question": "q", "thinking_depth": 9}, {"loc": ["body", "thinking_depth"]}),
        ("/batch", {"prompts": []}, {"loc": ["body", "prompts"]}),
    ],
)
async def test_an_invalid_body_is_a_422_with_fastapis_detail(path: str, body: Any, problem: dict[str, Any]) -> None:
    async with client_for(FakePool()) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail == {**detail, **problem} and isinstance(detail["msg"], str)


async def test_a_body_that_is_not_json_is_a_422() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post("/api/v1/chat", content=b"{not json")
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"


async def test_no_model_loaded_is_503_and_a_model_failure_500_bad_input_never() -> None:
    pool = FakePool()
    pool.is_ready = False
    async with client_for(pool) as client:
        for path in ("/api/v1/health", "/api/v1/model/info", "/model/info"):
            response = await client.get(path)
            assert response.status_code == 503 and isinstance(response.json()["detail"], str), path
        response = await client.post("/api/v1/model/load")
        assert response.status_code == 503 and "detail" in response.json()
    async with client_for(FakePool([InternalError("the GPU fell over")])) as client:
        failed = await client.post("/chat", json={"messages": [{"role": "user", "content": "u"}]})
    assert failed.status_code == 500 and failed.json() == {"detail": "the GPU fell over"}
    async with client_for(FakePool([ContextLengthExceeded("The prompt is 300 tokens, but max_length is 200")])) as c:
        too_long = await c.post("/", json={"prompt": "x", "max_length": 200})
    assert too_long.status_code == 400 and too_long.json()["detail"].startswith("The prompt is 300 tokens")


async def test_unknown_route_and_method_are_fastapis_404_and_405() -> None:
    async with client_for(FakePool()) as client:
        wrong_method = await client.get("/batch")
        ollama_root = await client.post("/api/chat", content=b"{")
    assert wrong_method.status_code == 405 and "detail" in wrong_method.json()
    assert "error" in ollama_root.json()  # the Ollama routes keep Ollama's shape


# -- streams ------------------------------------------------------------------------------------


async def test_000_stream_error_event_and_end() -> None:
    async with client_for(FakePool([Delta(id=0, text="Hel"), InternalError("worker crashed")])) as client:
        events = sse_events(await client.post("/api/v1/chat/stream", json={"message": "m"}))
    assert events == [
        {"type": "start", "content": ""},
        {"type": "chunk", "content": "Hel"},
        {"type": "error", "content": "worker crashed"},
    ]


async def test_000_stream_without_thinking_has_no_think_tags() -> None:
    async with client_for(FakePool([Delta(id=0, text="Hi"), done()])) as client:
        events = sse_events(await client.post("/api/v1/chat/stream", json={"message": "m", "history": []}))
    assert events == [
        {"type": "start", "content": ""},
        {"type": "chunk", "content": "Hi"},
        {"type": "end", "content": ""},
    ]


@pytest.mark.parametrize(("path", "field"), [("/chat", "response"), ("/generate", "generated_text")])
async def test_003_stream_true_is_sse_pieces_then_usage(path: str, field: str) -> None:
    body = {"messages": [{"role": "user", "content": "u"}]} if path == "/chat" else {"prompt": "p"}
    async with client_for(FakePool()) as client:
        events = sse_events(await client.post(path, json={**body, "stream": True}))
    assert events[:-2] == [{field: "Hel"}, {field: "lo"}]
    assert events[-2] == {
        field: "",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "model": CARD.name,
    }
    assert events[-1] == "[DONE]"


async def test_a_client_that_leaves_a_seed_stream_aborts_its_request() -> None:
    pool = FakePool([Delta(id=0, text="Hel"), "hang"])
    body = [{"type": "http.request", "body": json.dumps({"message": "m"}).encode()}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await pool.hanging.wait()
        return {"type": "http.disconnect"}

    async def ignore(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/api/v1/chat/stream", "headers": [], "query_string": b""}
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app(scope, receive, ignore), 5)
    assert len(pool.aborted) == 1


# -- shared routes ------------------------------------------------------------------------------


async def test_info_routes_report_what_the_worker_reports() -> None:
    pool = FakePool()
    async with client_for(pool) as client:
        info = (await client.get("/api/v1/model/info")).json()
        factory = (await client.get("/model/info")).json()
        health = (await client.get("/health")).json()
        loaded = (await client.post("/api/v1/model/load")).json()
        named = await client.post("/api/v1/model/load", json={"model_name": "nope"})
    assert info == {"model_name": CARD.name, "device": "cuda:1", "is_loaded": True, "model_size": 8_044_000_000}
    assert factory["model_path"] == "/models/Qwen3-4B-Thinking" and factory["template"] == "qwen3"
    assert health["model_loaded"] is True and factory["status"] == "loaded"
    assert health["gpu_available"] is True and health["memory"] == {"used_bytes": 9e9, "total_bytes": 8e10}
    assert loaded["status"] == "loaded" and named.status_code == 404 and "detail" in named.json()


async def test_a_model_listed_but_not_loaded_is_reported_unloaded() -> None:
    """Under the supervisor's registry a model stays listed after keep_alive unloads it: no ready worker serves it
    then, and the info routes say so, with the catalog's size; once loaded, the worker's card gives the size."""
    pool = FakePool()
    pool.workers = []  # listed (pool.models()), no worker serving it
    async with client_for(pool) as client:
        info = (await client.get("/api/v1/model/info")).json()
        factory = (await client.get("/model/info")).json()
        health = (await client.get("/health")).json()
        pool.workers = [FakeWorker(info=msgspec.structs.replace(INFO, models=[], device="cuda:0"))]  # another model
        other = (await client.get("/api/v1/model/info")).json()
        loaded = msgspec.structs.replace(CARD, size_bytes=2_500_000_000)  # quantized as the worker loaded it
        pool.workers = [FakeWorker(info=msgspec.structs.replace(INFO, models=[loaded]))]
        served = (await client.get("/api/v1/model/info")).json()
        pool.workers[0].draining = True
        draining = (await client.get("/health")).json()
    assert info == {"model_name": CARD.name, "device": "", "is_loaded": False, "model_size": 8_044_000_000}
    assert factory["status"] == "unloaded" and other["is_loaded"] is False and other["device"] == ""
    assert (health["model_loaded"], health["model_name"]) == (False, CARD.name)
    assert served == {"model_name": CARD.name, "device": "cuda:1", "is_loaded": True, "model_size": 2_500_000_000}
    assert draining["model_loaded"] is False


async def test_root_answers_ollama_text_unless_json_is_asked_for() -> None:
    async with client_for(FakePool()) as client:
        plain = await client.get("/")
        asked = await client.get("/", headers={"Accept": "application/json"})
        head = await client.head("/")
    async with client_for(FakePool(), root_json=True) as client:
        flagged = await client.get("/")
        text_asked = await client.get("/", headers={"Accept": "text/plain"})
    assert plain.text == "Ollama is running" and head.status_code == 200 and text_asked.text == "Ollama is running"
    expected = {"message": "tandem API service", "version": "0.9.1", "docs": "/docs", "health": "/health"}
    assert asked.json() == expected and flagged.json() == expected


async def test_stats_count_the_seed_routes_and_carry_001s_fields() -> None:
    async with client_for(FakePool([Delta(id=0, text="x"), done()])) as client:
        await client.post("/chat", json={"messages": [{"role": "user", "content": "u"}]})
        await client.post("/", json={"prompt": "p"})
        await client.get("/")  # Ollama's probe is not a generation
        await client.post("/generate", json={})  # 422
        stats = (await client.get("/stats")).json()
    assert (stats["total_requests"], stats["successful_requests"], stats["failed_requests"]) == (3, 2, 1)
    assert stats["success_rate"] == round(2 / 3, 4) and stats["uptime"] >= 0 and "average_response_time" in stats
    assert stats["requests"]["total"] == 3  # tandem's own nested figures agree
