"""A stand-in for WorkerPool in the dialect tests: scripted events, recorded aborts, no worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from common.protocol import Delta, Done, Generate, ModelCard
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
        self.hanging = asyncio.Event()
        self.workers: list[Any] = []
        self.is_ready = True

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def models(self) -> list[ModelCard]:
        return [self.card]

    def find_model(self, name: str) -> ModelCard:
        if model_key(name) == model_key(self.card.name):
            return self.card
        raise ModelNotFound(name)

    async def ensure_loaded(self, name: str) -> ModelCard:
        return self.find_model(name)

    async def generate(self, request: Generate) -> AsyncIterator[Delta | Done]:
        self.requests.append(request)
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
