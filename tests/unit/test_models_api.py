"""The model routes and embeddings on a scripted pool: input forms, float and base64 decoding to the same vectors,
keep_alive parsing, load and unload answers, pull, and the refusals in each dialect's shape."""

from __future__ import annotations

import base64
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from fake_pool import ScriptedPool

from common.control import parse_duration
from common.protocol import ModelCard
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import BadRequest
from gateway.request_types import keep_alive_seconds

pytestmark = pytest.mark.anyio

ENCODER = ModelCard(
    name="all-MiniLM-L6-v2",
    context_length=256,
    architecture="bert",
    vocab_size=30522,
    capabilities=["embedding"],
    embedding_length=4,
)
CHAT = ModelCard(name="SmolLM2-135M-Instruct", context_length=8192, capabilities=["completion"])
VECTORS = [struct.pack("<4f", 0.5, 0.5, 0.5, 0.5), struct.pack("<4f", 0.1, 0.7, -0.7, 0.1)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pool_for(card: ModelCard) -> ScriptedPool:
    pool = ScriptedPool(card, [])
    pool.vectors = VECTORS
    return pool


@contextlib.asynccontextmanager
async def client_for(pool: ScriptedPool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), ("5m", 300.0), (300, 300.0), ("1h30m", 5400.0), (-1, -1.0), ("-5m", -1.0)],
)
def test_keep_alive_as_ollama_reads_it(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", True, [1], {"m": 5}])
def test_a_bad_keep_alive_is_a_400(value: Any) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        keep_alive_seconds(value)


def test_durations() -> None:
    assert parse_duration("300ms") == 0.3 and parse_duration("1.5h") == 5400.0 and parse_duration("-1") == -1.0
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


@pytest.mark.parametrize(
    ("value", "inputs"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([101, 102], [[101, 102]]),
        ([[101], [7, 8]], [[101], [7, 8]]),
    ],
)
async def test_openai_input_forms(value: Any, inputs: list[Any]) -> None:
    pool = pool_for(ENCODER)
    async with client_for(pool) as client:
        response = await client.post("/v1/embeddings", json={"model": ENCODER.name, "input": value, "keep_alive": "1m"})
    body = response.json()
    assert response.status_code == 200 and pool.embedded[0].inputs == inputs and pool.keep_alives == [60.0]
    assert [d["index"] for d in body["data"]] == list(range(len(inputs)))
    assert body["usage"] == {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}


@pytest.mark.parametrize(
    "value", ["", [], [""], ["a", 1], [[]], [[1, "x"]], [True], [30522], 5, {"text": "a"}], ids=repr
)
async def test_openai_bad_inputs_are_400s(value: Any) -> None:
    async with client_for(pool_for(ENCODER)) as client:
        response = await client.post("/v1/embeddings", json={"model": ENCODER.name, "input": value})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


async def test_float_and_base64_decode_to_the_same_vectors_in_the_sdk() -> None:
    pool = pool_for(ENCODER)
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem/v1")
        client = openai.AsyncOpenAI(base_url="http://tandem/v1", api_key="x", http_client=http, max_retries=0)
        default = await client.embeddings.create(model=ENCODER.name, input=["a", "b"])  # base64 (numpy is here)
        floats = await client.embeddings.create(model=ENCODER.name, input=["a", "b"], encoding_format="float")
        raw = await http.post("embeddings", json={"model": ENCODER.name, "input": "a", "encoding_format": "base64"})
    expected = [list(struct.unpack("<4f", v)) for v in VECTORS]
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data] == expected
    assert base64.b64decode(raw.json()["data"][0]["embedding"]) == VECTORS[0]


async def test_ollama_embed_and_legacy_embeddings() -> None:
    pool = pool_for(ENCODER)
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        client = ollama.AsyncClient(host="http://tandem", transport=httpx.ASGITransport(app=app))
        embedded = await client.embed(model=ENCODER.name, input=["a", "b"], truncate=False, dimensions=2)
        legacy = await client.embeddings(model=ENCODER.name, prompt="a")
        loading = await client.embed(model=ENCODER.name, input=[], keep_alive="10m")
    assert embedded.embeddings == [list(struct.unpack("<4f", v)) for v in VECTORS]
    assert embedded.prompt_eval_count == 6 and embedded.total_duration and embedded.total_duration > 0
    assert pool.embedded[0].truncate is False and pool.embedded[0].dimensions == 2
    assert legacy.embedding == list(struct.unpack("<4f", VECTORS[0]))
    assert loading.embeddings == [] and pool.keep_alives[-1] == 600.0


async def test_embedding_model_and_chat_model_stay_in_their_lanes() -> None:
    async with client_for(pool_for(ENCODER)) as client:
        chat = await client.post(
            "/api/chat", json={"model": ENCODER.name, "messages": [{"role": "user", "content": "x"}]}
        )
        generate = await client.post("/api/generate", json={"model": ENCODER.name, "prompt": "x"})
        completions = await client.post(
            "/v1/chat/completions", json={"model": ENCODER.name, "messages": [{"role": "user", "content": "x"}]}
        )
        too_many = await client.post("/v1/embeddings", json={"model": ENCODER.name, "input": "x", "dimensions": 5})
    assert (chat.status_code, chat.json()) == (400, {"error": f'"{ENCODER.name}" does not support chat'})
    assert generate.json() == {"error": f'"{ENCODER.name}" does not support generate'}
    assert completions.status_code == 400 and completions.json()["error"]["param"] == "model"
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "dimensions"
    async with client_for(pool_for(CHAT)) as client:
        embed = await client.post("/api/embed", json={"model": CHAT.name, "input": "x"})
        openai_embed = await client.post("/v1/embeddings", json={"model": CHAT.name, "input": "x"})
    assert (embed.status_code, embed.json()) == (
        400,
        {"error": f'"{CHAT.name}" does not support embeddings: use an embedding model'},
    )
    assert openai_embed.status_code == 400 and openai_embed.json()["error"]["type"] == "invalid_request_error"


async def test_keep_alive_reaches_the_pool_from_every_route() -> None:
    pool = ScriptedPool(CHAT, lambda request: [])
    async with client_for(pool) as client:
        await client.post("/api/chat", json={"model": CHAT.name, "messages": [], "keep_alive": "2m"})
        await client.post("/api/generate", json={"model": CHAT.name, "prompt": "", "keep_alive": -1})
        unload = await client.post("/api/chat", json={"model": CHAT.name, "messages": [], "keep_alive": "0s"})
        bad = await client.post("/api/chat", json={"model": CHAT.name, "messages": [], "keep_alive": "later"})
    assert pool.keep_alives == [120.0, -1.0] and pool.unloaded == [CHAT.name]
    assert unload.json()["done_reason"] == "unload"
    assert bad.status_code == 400 and bad.json()["error"].startswith("keep_alive: invalid duration 'later'")


async def test_pull_and_the_refused_model_routes() -> None:
    async with client_for(pool_for(CHAT)) as client:
        streamed = await client.post("/api/pull", json={"model": CHAT.name + ":latest"})
        whole = await client.post("/api/pull", json={"name": CHAT.name, "stream": False})
        unknown = await client.post("/api/pull", json={"model": "llama3"})
        refused = [
            await client.request(method, path, json={"model": CHAT.name, "source": CHAT.name, "destination": "x"})
            for method, path in (
                ("DELETE", "/api/delete"),
                ("POST", "/api/copy"),
                ("POST", "/api/create"),
                ("POST", "/api/push"),
            )
        ]
    lines = [line for line in streamed.text.splitlines() if line]
    assert lines[0] == '{"status":"pulling manifest"}' and lines[-1] == '{"status":"success"}'
    assert whole.json() == {"status": "success"}
    assert (unknown.status_code, unknown.json()) == (404, {"error": "pull model manifest: file does not exist"})
    assert [r.status_code for r in refused] == [501] * 4
    assert all(r.json()["error"].startswith("tandem does not") for r in refused)
