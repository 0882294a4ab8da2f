"""LoRA adapters at the gateway: vLLM's load/unload routes and their answers, adapters listed with their parent in
both dialects, and a request naming an adapter sent to its base model's worker with the adapter named."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from fake_pool import ScriptedPool
from test_pool import CARD, pool_and_worker, until

from common.protocol import Done, Generate, ModelCard, Usage
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import BadRequest, GatewayError, ModelNotFound, NotFound
from gateway.workers import model_key

pytestmark = pytest.mark.anyio

BASE = ModelCard(name="SmolLM2-135M-Instruct", context_length=8192, capabilities=["completion"], format="gguf")
ADAPTER = msgspec.structs.replace(BASE, name="tune", parent=BASE.name, format="safetensors")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class AdapterPool(ScriptedPool):
    """The scripted pool, with adapters: listed beside the base, loaded and unloaded as the supervisor would."""

    def __init__(self) -> None:
        super().__init__(BASE, [Done(id=0, finish_reason="stop", usage=Usage(1, 1))])
        self.adapters = [ADAPTER]
        self.calls: list[tuple[str, ...]] = []
        self.refuse: GatewayError | None = None

    def models(self) -> list[ModelCard]:
        return [BASE, *self.adapters]

    def find_model(self, name: str) -> ModelCard:
        for card in self.models():
            if model_key(card.name) == model_key(name):
                return card
        raise ModelNotFound(name)

    async def add_adapter(self, name: str, path: str, base: str | None = None) -> None:
        self.calls.append(("add", name, path, str(base)))
        if self.refuse:
            raise self.refuse

    async def remove_adapter(self, name: str) -> None:
        self.calls.append(("remove", name))
        if self.refuse:
            raise self.refuse


@contextlib.asynccontextmanager
async def client_for(pool: AdapterPool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


async def test_load_and_unload_answer_as_vllm_does() -> None:
    pool = AdapterPool()
    async with client_for(pool) as client:
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/adapters/new"})
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "new"})
        based = await client.post(
            "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/a", "base_model_name": BASE.name}
        )
    assert loaded.status_code == 200 and loaded.headers["content-type"].startswith("text/plain")
    assert loaded.text == "Success: LoRA adapter 'new' added successfully."
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'new' removed successfully."
    assert based.status_code == 200
    assert pool.calls == [("add", "new", "/adapters/new", "None"), ("remove", "new"), ("add", "x", "/a", BASE.name)]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/load_lora_adapter", {"lora_name": "x"}, "Both 'lora_name' and 'lora_path' must be provided."),
        ("/v1/load_lora_adapter", {"lora_path": "/a"}, "Both 'lora_name' and 'lora_path' must be provided."),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/a", "load_inplace": True}, "load_inplace"),
        ("/v1/load_lora_adapter", {"lora_name": 3, "lora_path": "/a"}, "Expected `str`"),
        ("/v1/unload_lora_adapter", {}, "'lora_name' needs to be provided to unload a LoRA adapter."),
    ],
)
async def test_requests_missing_what_they_need_are_400s(path: str, body: dict, message: str) -> None:
    pool = AdapterPool()
    async with client_for(pool) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "invalid_request_error" and pool.calls == []


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (BadRequest("no adapter_config.json in /a: not a PEFT adapter folder"), 400),
        (NotFound("The lora adapter 'x' cannot be found."), 404),
    ],
)
async def test_the_supervisor_s_refusals_keep_their_status_and_reason(refusal: GatewayError, status: int) -> None:
    pool = AdapterPool()
    pool.refuse = refusal
    async with client_for(pool) as client:
        loaded = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/a"})
        unloaded = await client.post("/v1/unload_lora_adapter", json={"lora_name": "x"})
    for response in (loaded, unloaded):
        assert response.status_code == status and response.json()["error"]["message"] == refusal.message


async def test_adapters_are_listed_with_their_parent_in_both_dialects() -> None:
    async with client_for(AdapterPool()) as client:
        models = (await client.get("/v1/models")).json()["data"]
        one = (await client.get("/v1/models/tune")).json()
        tags = (await client.get("/api/tags")).json()["models"]
        shown = (await client.post("/api/show", json={"model": "tune"})).json()
    assert [(m["id"], m["parent"]) for m in models] == [(BASE.name, None), ("tune", BASE.name)]
    assert one["parent"] == BASE.name
    assert [(t["name"], t["details"]["parent_model"]) for t in tags] == [
        (f"{BASE.name}:latest", ""),
        ("tune:latest", f"{BASE.name}:latest"),
    ]
    assert shown["details"]["parent_model"] == f"{BASE.name}:latest"


async def test_a_request_for_an_adapter_goes_to_its_base_s_worker() -> None:
    async with pool_and_worker() as (pool, worker):
        adapter = msgspec.structs.replace(CARD, name="tune", parent=CARD.name)
        worker.models.append(adapter)  # the worker lists its adapters with its next heartbeat answer
        await until(lambda: any(c.name == "tune" for w in pool.workers if w.info for c in w.info.models))
        task = asyncio.create_task(first_event(pool, Generate(id=0, model="TUNE", prompt="hi")))
        await until(lambda: worker.generates)
        [sent] = worker.generates
        assert (sent.model, sent.adapter) == (CARD.name, "tune")
        await worker.send(Done(id=sent.id, finish_reason="stop", usage=Usage(1, 1)))
        assert isinstance(await task, Done)


async def first_event(pool: object, request: Generate) -> object:
    async for event in pool.generate(request):  # type: ignore[attr-defined]
        return event
    return None
