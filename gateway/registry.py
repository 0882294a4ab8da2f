"""The gateway's side of the supervisor's control socket (common/control.py): it follows the published Registry
(every available model, and where the loaded ones run), asks for loads and unloads, and tells the supervisor what it
has in flight, so the supervisor — one place, however many gateways — decides what stays loaded.

Concurrent first requests for a model share one Load. Every Registry applied is acknowledged at once (a Beat), so
a model taken out of service is stopped as soon as no gateway can still send it a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from common.control import (
    AddAdapter,
    Answer,
    Beat,
    Load,
    Placement,
    Registry,
    RemoveAdapter,
    Unload,
    Use,
    encode,
    from_supervisor_decoder,
)
from common.protocol import ModelCard
from gateway.errors import BadRequest, GatewayError, InternalError, ModelNotFound, NotFound, Unavailable

logger = logging.getLogger(__name__)

BEAT_INTERVAL = 0.5


def model_key(name: str) -> str:
    """Ollama clients say `name:latest`; both dialects match names case-insensitively."""
    return name.strip().lower().removesuffix(":latest")


class RegistryClient:
    def __init__(self, address: str, context: zmq.asyncio.Context, on_change: Callable[[], None]) -> None:
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.on_change = on_change
        self.version = 0
        self.catalog_version = 0
        self.models: list[ModelCard] = []  # every available model, in listing order
        self.placements: dict[str, Placement] = {}  # by model_key
        self.busy: Counter[str] = Counter()  # model name → requests in flight here
        self._ids = itertools.count(1)
        self._answers: dict[int, asyncio.Future[Answer]] = {}
        self._loads: dict[str, asyncio.Future[None]] = {}  # one Load per model at a time, shared by its waiters
        self._applied = asyncio.Event()  # set (and replaced) whenever a Registry is applied
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def is_ready(self) -> bool:
        return self.version > 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._read(), name="registry read")]
        self._tasks.append(asyncio.create_task(self._beat(), name="registry beat"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.socket.close(linger=100)

    # -- what the pool asks -----------------------------------------------------------------

    def card(self, name: str) -> ModelCard:
        if not self.is_ready:
            raise Unavailable("The server is starting; try again shortly", headers={"Retry-After": "1"})
        for card in self.models:
            if model_key(card.name) == model_key(name):
                return card
        raise ModelNotFound(name)

    def placement(self, name: str) -> Placement | None:
        return self.placements.get(model_key(name))

    def hold(self, name: str) -> None:
        """A request for `name` starts waiting or running here: the model must not be unloaded under it."""
        self.busy[name] += 1
        if self.busy[name] == 1:
            self.beat_now()

    def release(self, name: str) -> None:
        self.busy[name] -= 1
        if self.busy[name] <= 0:
            del self.busy[name]
            self.beat_now()  # idle now: its keep_alive starts counting (keep_alive 0: it unloads)

    def use(self, name: str, keep_alive: float | None) -> None:
        self._send(Use(model=name, keep_alive=keep_alive))

    async def load(self, name: str, keep_alive: float | None) -> None:
        """Until the supervisor says `name` is loaded and this gateway has applied the Registry that shows it.
        Waiters share one Load; each still sets its keep_alive, as each Ollama request does."""
        shared = self._loads.get(model_key(name))
        if shared is None or shared.done():
            shared = asyncio.ensure_future(self._request(Load(id=next(self._ids), model=name, keep_alive=keep_alive)))
            shared.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even with no waiter left
            self._loads[model_key(name)] = shared
        else:
            self.use(name, keep_alive)
        await asyncio.shield(shared)  # one waiter leaving (client gone, timeout) leaves the load to the others

    async def unload(self, name: str) -> None:
        """Until the model's workers have exited (after the requests it still serves)."""
        await self._request(Unload(id=next(self._ids), model=name))

    async def add_adapter(self, name: str, path: str, base: str | None) -> None:
        """Until the adapter is listed (its base's workers have read it, if the base is loaded), or why not."""
        await self._request(AddAdapter(id=next(self._ids), name=name, path=path, base=base))

    async def remove_adapter(self, name: str) -> None:
        await self._request(RemoveAdapter(id=next(self._ids), name=name))

    async def _request(self, message: Load | Unload | AddAdapter | RemoveAdapter) -> None:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._answers[message.id] = future
        try:
            self._send(message)
            answer = await future
        finally:
            self._answers.pop(message.id, None)
        if answer.code != "ok":
            if isinstance(message, AddAdapter | RemoveAdapter):
                raise _error_for(answer, message.name, adapter=True)
            raise _error_for(answer, message.model)
        while self.version < answer.version:  # the Registry that shows the outcome follows the answer
            await self._applied.wait()

    # -- the socket -------------------------------------------------------------------------

    def beat_now(self) -> None:
        self._send(Beat(seen=self.version, catalog=self.catalog_version, busy=dict(self.busy)))

    def _send(self, message: Beat | Use | Load | Unload | AddAdapter | RemoveAdapter) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the supervisor is not there (yet): the next beat asks again
            self.socket.send(encode(message), flags=zmq.NOBLOCK)

    async def _beat(self) -> None:
        while True:
            self.beat_now()
            await asyncio.sleep(BEAT_INTERVAL)

    async def _read(self) -> None:
        while True:
            frame = await self.socket.recv()
            try:
                message = from_supervisor_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                logger.error("the supervisor sent a malformed frame: %s", exc)
                continue
            if isinstance(message, Answer):
                future = self._answers.get(message.id)
                if future is not None and not future.done():
                    future.set_result(message)
            elif message.version >= self.version:
                self._apply(message)

    def _apply(self, registry: Registry) -> None:
        if registry.models is not None:
            self.models, self.catalog_version = registry.models, registry.catalog_version
        self.version = registry.version
        self.placements = {model_key(p.name): p for p in registry.placements}
        self.on_change()
        self.beat_now()  # acknowledged at once: an unload waits for every gateway's ack
        self._applied.set()
        self._applied = asyncio.Event()


def _error_for(answer: Answer, model: str, adapter: bool = False) -> GatewayError:
    match answer.code:
        case "not_found":
            return NotFound(answer.message) if adapter else ModelNotFound(model)
        case "invalid":
            return BadRequest(answer.message)
        case "busy":
            return Unavailable(answer.message, headers={"Retry-After": "5"})
        case _:
            return InternalError(answer.message)
