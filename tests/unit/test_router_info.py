"""The routes a router reads to learn a server's model (gateway/router_info.py), on a scripted pool.

The shape checks mirror what sglang-router 0.3.x parses: `served_model_name` or `model_path` names the model,
optional fields must have the JSON type it expects or it drops the whole answer, `model` and `model_id` are
one field there (never both).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fake_pool import ScriptedPool

from common.protocol import ModelCard, WorkerInfo
from gateway.app import create_app
from gateway.config import GatewayConfig

pytestmark = pytest.mark.anyio

SMOL = ModelCard(name="SmolLM2-135M-Instruct", context_length=8192, architecture="llama")
QWEN = ModelCard(name="Qwen3-0.6B", context_length=40960, architecture="qwen3")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Pool(ScriptedPool):
    """A pool serving `cards` (none: no worker ready yet) from ready workers with these `max_running`."""

    def __init__(self, cards: list[ModelCard], max_running: tuple[int, ...] = ()) -> None:
        super().__init__(cards[0] if cards else SMOL, [])
        self.cards = cards
        self.is_ready = bool(cards)
        for limit in max_running:
            info = WorkerInfo(
                instance="i", pid=1, models=cards, device="cpu", started_at=0.0, max_running=limit, max_waiting=1
            )
            self.workers.append(SimpleNamespace(is_ready=True, info=info))

    def models(self) -> list[ModelCard]:
        return list(self.cards)


@contextlib.asynccontextmanager
async def client_for(pool: Pool, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(workers=(), **config), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


async def test_server_info_names_the_served_model_as_sglang_router_reads_it() -> None:
    async with client_for(Pool([SMOL], max_running=(64, 16))) as client:
        response = await client.get("/server_info")
        older = await client.get("/get_server_info")
    assert response.status_code == 200
    body = response.json()
    assert body["served_model_name"] == body["model_path"] == "SmolLM2-135M-Instruct"
    assert not ({"model", "model_id"} <= body.keys())  # one serde field in the router: both would fail it
    assert body["tp_size"] == body["dp_size"] == 1  # one server however many workers: the gateway balances them
    assert body["max_running_requests"] == 80  # over the ready workers
    assert body["version"] == GatewayConfig.version and isinstance(body["version"], str)
    assert older.json() == body


async def test_model_info_says_what_kind_of_model_it_is() -> None:
    async with client_for(Pool([SMOL])) as client:
        response = await client.get("/model_info")
        older = await client.get("/get_model_info")
    assert response.status_code == 200
    body = response.json()
    assert body["model_path"] == "SmolLM2-135M-Instruct"
    assert body["is_generation"] is True
    assert body["model_type"] == "llama"
    assert "architectures" not in body  # the card does not know the HF class names; absent beats invented
    assert older.json() == body


async def test_a_server_with_several_models_shows_the_first_and_lists_them_all() -> None:
    async with client_for(Pool([QWEN, SMOL])) as client:
        body = (await client.get("/server_info")).json()
        info = (await client.get("/model_info")).json()
    assert body["served_model_name"] == info["model_path"] == "Qwen3-0.6B"
    assert body["models"] == ["Qwen3-0.6B", "SmolLM2-135M-Instruct"]


@pytest.mark.parametrize("path", ["/server_info", "/model_info", "/get_model_info"])
async def test_before_a_worker_is_ready_the_router_is_told_to_retry(path: str) -> None:
    async with client_for(Pool([])) as client:
        response = await client.get(path)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "error" in response.json()


async def test_with_api_keys_the_routes_need_one_as_the_model_list_does() -> None:
    async with client_for(Pool([SMOL]), api_keys=("k1",)) as client:
        refused = await client.get("/server_info")
        allowed = await client.get("/server_info", headers={"authorization": "Bearer k1"})
    assert refused.status_code == 401
    assert allowed.status_code == 200
