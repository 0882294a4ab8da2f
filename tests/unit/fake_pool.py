"""A stand-in for WorkerPool in the dialect tests: scripted events, recorded aborts, no worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.control import Placement
from common.protocol import Delta, Done, Embed, Embeddings, Generate, ModelCard
from gateway.errors import GatewayError, ModelNotFound
from gateway.workers import model_key

Step = Delta | Done | GatewayError | str  # "hang": wait until cancelled


class ScriptedPool:
    """The WorkerPool methods the gateway calls, yielding scripted events and recording aborts."""

    def __init__(self, card: ModelCard, script: Callable[[Generate], list[Step]] | list[Step]) -> None:
        self.card = card
        self.script = script if callable(script) else (lambda request: list(script))
        self.requests: list[Generate] = []
        self.aborted: list[Generate] = []
        self.keep_alives: list[float | None] = []  # of every generate, load and embed
        self.unloaded: list[str] = []
        self.embedded: list[Embed] = []
        self.vectors: list[bytes] = []  # what embed() answers for every input
        self.hanging = asyncio.Event()
        self.workers: list[Any] = []
        self.is_ready = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def models(self) -> list[ModelCard]:
        return [self.card]

    def loaded(self) -> list[tuple[ModelCard, Placement | None]]:
        return [(self.card, None)]

    def discovered(self) -> dict[str, list[str]]:
        return {}

    async def load(self, model: str, keep_alive: float | None = None) -> float:
        self.find_model(model)
        self.keep_alives.append(keep_alive)
        return 0.0

    async def unload(self, model: str) -> None:
        self.find_model(model)
        self.unloaded.append(model)

    async def embed(self, request: Embed, keep_alive: float | None = None) -> Embeddings:
        self.embedded.append(request)
        self.keep_alives.append(keep_alive)
        vectors = [self.vectors[i % len(self.vectors)] for i in range(len(request.inputs))]
        return Embeddings(id=request.id, vectors=vectors, num_prompt_tokens=3 * len(request.inputs))

    def find_model(self, name: str) -> ModelCard:
        if model_key(name) == model_key(self.card.name):
            return self.card
        raise ModelNotFound(name)

    async def ensure_loaded(self, name: str) -> ModelCard:
        return self.find_model(name)

    async def generate(self, request: Generate, keep_alive: float | None = None) -> AsyncIterator[Delta | Done]:
        self.requests.append(request)
        self.keep_alives.append(keep_alive)
        finished = False
        try:
            for step in self.script(request):
                if step == "hang":
                    self.hanging.set()
                    await asyncio.sleep(3600)
                elif isinstance(step, GatewayError):
                    finished = True
                    raise step
                else:
                    assert isinstance(step, Delta | Done)
                    finished = isinstance(step, Done)
                    yield step
        finally:
            if not finished:
                self.aborted.append(request)
