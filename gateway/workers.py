"""Connections to workers: one DEALER socket each (gateway/connection.py), a heartbeat, routing, and the in-flight
table.

One reader task per worker fans incoming events out to per-request buffers (bounded: gateway/request_buffer.py).
A worker that stops answering heartbeats, or comes back as a new instance, fails every request that was waiting
on it. Whenever the gateway stops waiting for a request before its end — client gone, timeout, worker gone,
buffer overflow — it sends Abort, and it aborts any request the worker talks about that it no longer knows, so
nothing runs in a worker for nobody. Every event of every request passes through `generate()`, so that is where
the request metrics are taken.

The workers are a fixed list (`--worker`), or follow the supervisor's Registry (`--registry`, gateway/registry.py):
then a request for a model that is not loaded asks for it and waits (bounded by the request timeout, like the rest
of the request), and the pool connects to each new worker and drops each stopped one. Or they are discovered
(gateway/discovery.py: DNS names, Ray), asked again every few seconds: a new address is connected; one that is gone
is drained — no new requests, those in flight finish (or fail cleanly if the worker is dead) — then dropped.

Among the workers that serve a model, `_pick` routes by prompt prefix (gateway/routing.py) or by load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from common.control import Placement
from common.curve import CurveKeys
from common.protocol import (
    Delta,
    Done,
    Embed,
    Embeddings,
    Failed,
    Generate,
    ModelCard,
    encode,
)
from gateway.connection import WATCHED, WorkerConnection, error_for
from gateway.discovery import Discovery
from gateway.errors import (
    BadRequest,
    ClientTooSlowError,
    InternalError,
    ModelNotFound,
    ServerBusy,
    Unavailable,
)
from gateway.membership import Membership
from gateway.metrics import Metrics
from gateway.observe import current_trace
from gateway.registry import RegistryClient, model_key
from gateway.request_buffer import MAX_BYTES, RequestBuffer, WorkerGone
from gateway.routing import CacheAwareRouter, RoutingConfig, routing_key

logger = logging.getLogger(__name__)

Event = Delta | Done | Embeddings | Failed
__all__ = ["WorkerConnection", "WorkerPool", "model_key"]


class Reply:
    """The one answer of an Embed, where a generation has a RequestBuffer (the same `put`)."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Embeddings | Failed | Delta | Done | Exception] = (
            asyncio.get_running_loop().create_future()
        )

    def put(self, event: Embeddings | Failed | Delta | Done | Exception, size: int = 0) -> bool:
        if not self.future.done():
            self.future.set_result(event)
        return True


class WorkerPool:
    """Every worker this gateway talks to. Created and closed in the app's lifespan."""

    def __init__(
        self,
        addresses: list[str],
        *,
        heartbeat_interval: float = 0.5,
        dead_after: float = 3.0,
        context: zmq.asyncio.Context | None = None,
        metrics: Metrics | None = None,
        max_in_flight: int | None = None,
        curve: CurveKeys | None = None,
        buffer_bytes: int = MAX_BYTES,
        registry: str | None = None,
        discovery: list[Discovery] | None = None,
        discovery_interval: float = 5.0,
        routing: RoutingConfig | None = None,
    ) -> None:
        self.context = context or zmq.asyncio.Context()
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.metrics = metrics or Metrics()
        self.max_in_flight = max_in_flight
        self.curve = curve
        self.buffer_bytes = buffer_bytes
        self.workers: list[WorkerConnection] = []
        self.registry = RegistryClient(registry, self.context, self._sync) if registry else None
        self._ids = itertools.count(1)
        self._started = False
        self._changed = asyncio.Event()  # set (and replaced) when a worker turns ready or the registry changes
        assert not (discovery and registry), "workers follow the registry or discovery, not both"
        self.membership = Membership(self, discovery or [], discovery_interval, static=set(addresses))
        routing = routing or RoutingConfig()
        self.router = CacheAwareRouter(routing) if routing.policy == "cache_aware" else None
        self.max_key_chars = routing.max_key_chars
        self._instances: dict[str, str] = {}  # the worker instance the router's tree describes, by address
        for address in addresses:
            self._add(address)

    def _add(self, address: str) -> WorkerConnection:
        socket, monitor = self._connect(address)
        worker = WorkerConnection(address, socket, monitor=monitor, metrics=self.metrics, on_ready=self._notify)
        self.workers.append(worker)
        self.metrics.worker_down(worker.address)  # a series from the start: "down" is visible before "up"
        if self._started:
            self._run(worker)
        return worker

    def _connect(self, address: str) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        """The worker's socket, connecting, and its monitor, watching from before the first connection attempt."""
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a worker that is not connected: a request must fail, not wait for a restart.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            self.curve.apply(socket)
        monitor = socket.get_monitor_socket(WATCHED)
        socket.connect(address)
        return socket, monitor

    def _run(self, worker: WorkerConnection) -> None:
        worker.tasks = [
            asyncio.create_task(worker.read(), name=f"read {worker.address}"),
            asyncio.create_task(
                worker.heartbeat(self.heartbeat_interval, self.dead_after), name=f"beat {worker.address}"
            ),
            asyncio.create_task(worker.watch(), name=f"watch {worker.address}"),
        ]

    def _drop(self, worker: WorkerConnection, reason: str, *, forget: bool = False) -> asyncio.Future[None]:
        """Out of the pool now (its waiting requests fail now); its tasks and socket close in the background.
        `forget`: its metric series go too (a discovered address may never come back)."""
        self.workers.remove(worker)
        worker.fail_all(reason)
        self.metrics.worker_down(worker.address)
        if forget:
            self.metrics.forget_worker(worker.address)
        if self.router is not None and self._instances.pop(worker.address, None) is not None:
            self.router.forget(worker.address)
        return asyncio.ensure_future(self._close_connection(worker))

    async def _close_connection(self, worker: WorkerConnection) -> None:
        for task in worker.tasks:
            task.cancel()
        for task in worker.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        worker.close_monitor()  # its watch task may never have run
        worker.socket.close(linger=200)  # milliseconds for the last Aborts to leave

    async def start(self) -> None:
        self._started = True
        for worker in self.workers:
            self._run(worker)
        if self.registry is not None:
            await self.registry.start()
        self.membership.start()

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
        await self.membership.close()
        for worker in list(self.workers):
            await self._drop(worker, "gateway shutting down")
        self.context.term()

    def _sync(self) -> None:
        """The registry changed: connect to new workers, drop those no model runs on any more."""
        assert self.registry is not None
        wanted = {address for p in self.registry.placements.values() for address in p.addresses}
        known = {worker.address for worker in self.workers}
        for address in wanted - known:
            self._add(address)
        for worker in [w for w in self.workers if w.address not in wanted]:
            self._drop(worker, "its model was unloaded")
        loading = {
            address for p in self.registry.placements.values() if p.state == "loading" for address in p.addresses
        }
        for worker in self.workers:
            if worker.address in loading:  # a new process on an address used before: not a restart to wait out
                worker.ever_ready = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- what the endpoints ask -------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        """Static and discovered workers: one answers and is not draining. With a registry: it has been heard, and
        every loaded model has a worker that answers this gateway (one restarting after a crash makes the server not
        ready, as it did with one fixed worker; so does a new one until its first heartbeat, for milliseconds)."""
        if self.registry is None:
            return any(worker.is_ready and not worker.draining for worker in self.workers)
        answering = {worker.address for worker in self.workers if worker.is_ready}
        serving = [p for p in self.registry.placements.values() if p.state == "ready"]
        return self.registry.is_ready and all(answering & set(p.addresses) for p in serving)

    def models(self) -> list[ModelCard]:
        """Every model there is (with a registry: loaded or not), each once, in listing order."""
        if self.registry is not None:
            return list(self.registry.models)
        seen: dict[str, ModelCard] = {}
        for worker in self.workers:
            if worker.info is not None:
                for card in worker.info.models:
                    seen.setdefault(model_key(card.name), card)
        return list(seen.values())

    def find_model(self, name: str) -> ModelCard:
        """The card of a model: the serving worker's (it knows the context it serves), else the registry's. With a
        registry, only what it lists: a LoRA adapter just unloaded may linger in its worker's last heartbeat."""
        listed = self.registry.card(name) if self.registry is not None else None
        for worker in self.workers:
            if worker.info is not None:
                for card in worker.info.models:
                    if model_key(card.name) == model_key(name):
                        return card
        if listed is not None:
            return listed
        if not self.is_ready:
            raise Unavailable("No model worker is ready yet; try again shortly", headers={"Retry-After": "1"})
        raise ModelNotFound(name)

    async def ensure_loaded(self, name: str) -> ModelCard:
        """Make `name` loaded and ready to serve (seed 000's POST /api/v1/model/load): through the registry where
        there is one; fixed workers only say whether one serves it (503 if none is ready, 404 if none serves it)."""
        await self.load(name)
        return self.find_model(name)

    def loaded(self) -> list[tuple[ModelCard, Placement | None]]:
        """The loaded models (Ollama's /api/ps) and where they run; fixed workers have no placement."""
        if self.registry is None:
            return [(card, None) for card in self.models()]
        cards = {model_key(card.name): card for card in self.registry.models}
        return [
            (cards[name], placement)
            for name, placement in self.registry.placements.items()
            if placement.state == "ready" and name in cards
        ]

    def discovered(self) -> dict[str, list[str]]:
        """What each discovery source saw last (/health)."""
        return {name: sorted(found) for name, found in self.membership.found.items()}

    def num_in_flight(self) -> int:
        return sum(worker.num_in_flight for worker in self.workers)

    async def load(self, model: str, keep_alive: float | None = None) -> float:
        """Load `model` (an empty Ollama request); the seconds waited. Fixed workers are always loaded. A LoRA
        adapter is loaded by loading its base model."""
        base = self.find_model(model).parent or model
        if self.registry is None:
            return 0.0
        started = time.monotonic()
        await self.registry.load(base, keep_alive)
        return time.monotonic() - started

    async def unload(self, model: str) -> None:
        """Unload `model` now, once its requests are done (`keep_alive: 0` with nothing to say); for a LoRA adapter,
        its base model (the adapter stays listed, and loads with its base again)."""
        base = self.find_model(model).parent or model  # fixed workers stay: the request is answered as Ollama would
        if self.registry is not None:
            await self.registry.unload(base)

    async def add_adapter(self, name: str, path: str, base: str | None = None) -> None:
        """Serve a LoRA adapter as the model `name` (POST /v1/load_lora_adapter)."""
        if self.registry is None:
            raise BadRequest("LoRA adapters load at run time through the launcher; fixed workers take --lora")
        await self.registry.add_adapter(name, path, base)

    async def remove_adapter(self, name: str) -> None:
        if self.registry is None:
            raise BadRequest("LoRA adapters unload at run time through the launcher; fixed workers take --lora")
        await self.registry.remove_adapter(name)

    async def generate(self, request: Generate, keep_alive: float | None = None) -> AsyncIterator[Delta | Done]:
        """Send one request and yield its events until Done. Raises GatewayError on failure.

        Leaving the loop early (client gone, error, cancellation) sends Abort to the worker. With a registry, a
        model that is not loaded is loaded first (the wait counts as the request's load_duration). A request for a
        LoRA adapter goes to its base model's worker, and holds the base loaded while it runs.
        """
        card = self.find_model(request.model)
        if card.parent:
            request = msgspec.structs.replace(request, model=card.parent, adapter=card.name)
        self._hold(request.model)
        try:
            key = routing_key(request, self.max_key_chars) if self.router is not None else None
            worker, waited = await self._acquire(request.model, keep_alive, key)
            async for event in self._generate(worker, request):
                if isinstance(event, Done) and waited > event.timings.load:
                    event = msgspec.structs.replace(event, timings=msgspec.structs.replace(event.timings, load=waited))
                yield event
        finally:
            self._release(request.model)

    async def _generate(self, worker: WorkerConnection, request: Generate) -> AsyncIterator[Delta | Done]:
        request = msgspec.structs.replace(request, id=next(self._ids))
        try:
            frame = encode(request)
        except (OverflowError, msgspec.EncodeError) as exc:  # the dialects range-check; this is the last guard
            raise BadRequest(f"A value in the request is out of range: {exc}") from None
        queue = RequestBuffer(max_bytes=self.buffer_bytes)
        worker.queues[request.id] = queue
        meter = self.metrics.meter(request.adapter or request.model)
        finished = False
        try:
            try:
                worker.send_now(frame)  # never wait for a worker that is not connected
            except zmq.ZMQError:
                finished = True  # it never reached the worker: nothing to abort
                meter.fail("worker_gone")
                raise Unavailable(
                    "The model worker is not connected; try again shortly", headers={"Retry-After": "1"}
                ) from None
            while True:
                event = await queue.get()
                if isinstance(event, WorkerGone):
                    meter.fail("worker_gone")  # not finished: if the worker is only frozen, the Abort reaches it
                    raise Unavailable(f"The model worker stopped while serving this request ({event})")
                if isinstance(event, Exception):  # ClientTooSlow: the buffer gave the request up
                    meter.fail("client_too_slow")
                    raise ClientTooSlowError(str(event))
                if isinstance(event, Failed):
                    finished = True
                    meter.fail(event.code)
                    raise error_for(event)
                if not isinstance(event, Delta | Done):
                    continue  # (an Embeddings for a generation: nothing a worker sends)
                meter.observe(event)
                if isinstance(event, Done):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            meter.close()
            worker.queues.pop(request.id, None)
            if not finished and request.id not in worker.orphans:  # (an overflowing buffer abandoned it already)
                logger.info("request %d: abandoned before done; sending Abort", request.id)
                worker.abandon(request.id)
            self.membership.settle(worker)

    async def embed(self, request: Embed, keep_alive: float | None = None) -> Embeddings:
        """Send one Embed and wait for its vectors; Abort if the wait ends early. Raises GatewayError on failure."""
        self._hold(request.model)
        try:
            worker, waited = await self._acquire(request.model, keep_alive)
            request = msgspec.structs.replace(request, id=next(self._ids))
            reply = Reply()
            worker.queues[request.id] = reply  # type: ignore[assignment]  # the same `put` as a RequestBuffer
            finished = False
            try:
                try:
                    worker.send_now(encode(request))
                except zmq.ZMQError:
                    finished = True
                    raise Unavailable("The model worker is not connected; try again shortly") from None
                event = await reply.future
                finished = not isinstance(event, WorkerGone)
                if isinstance(event, Exception):
                    raise Unavailable(f"The model worker stopped while serving this request ({event})")
                if isinstance(event, Failed):
                    self.metrics.request_errors.labels(request.model, event.code).inc()
                    raise error_for(event)
                if not isinstance(event, Embeddings):
                    raise InternalError(f"the worker answered an embedding request with {type(event).__name__}")
                self.metrics.request_success.labels(request.model, "stop").inc()
                self.metrics.prompt_tokens.labels(request.model).inc(event.num_prompt_tokens)
                trace = current_trace.get()
                if trace is not None:  # the request's log line
                    trace.model, trace.prompt_tokens = request.model, trace.prompt_tokens + event.num_prompt_tokens
                if waited > event.timings.load:
                    event = msgspec.structs.replace(event, timings=msgspec.structs.replace(event.timings, load=waited))
                return event
            finally:
                worker.queues.pop(request.id, None)
                if not finished and request.id not in worker.orphans:
                    worker.abandon(request.id)
                self.membership.settle(worker)
        finally:
            self._release(request.model)

    # -- routing ----------------------------------------------------------------------------

    def _hold(self, model: str) -> None:
        if self.registry is not None:
            self.registry.hold(model)

    def _release(self, model: str) -> None:
        if self.registry is not None:
            self.registry.release(model)

    async def _acquire(
        self, model: str, keep_alive: float | None, key: str | None = None
    ) -> tuple[WorkerConnection, float]:
        """A worker for `model`, and the seconds waited for it to load. Fixed workers: pick one now. With a
        registry: load the model if it is not (or is being unloaded), then wait for this gateway's connection to
        the new worker; a loaded model whose worker is down (restarting) is a 503 at once, as with fixed ones."""
        if self.registry is None:
            return self._pick(model, [w for w in self.workers if w.serves(model) and not w.draining], key), 0.0
        started, waited = time.monotonic(), False
        while True:
            placement = self.registry.placement(model)
            if placement is not None and placement.state == "ready":
                workers = [w for w in self.workers if w.address in placement.addresses]
                ready = [w for w in workers if w.is_ready]
                if ready:
                    self.registry.use(placement.name, keep_alive)
                    return self._pick(model, ready, key), time.monotonic() - started if waited else 0.0
                if any(w.ever_ready for w in workers):
                    raise Unavailable(
                        f"The worker of '{model}' is restarting; try again shortly", headers={"Retry-After": "1"}
                    )
                await self._changed.wait()  # just loaded: this gateway's first heartbeat is on its way
            else:
                await self.registry.load(model, keep_alive)
            waited = True

    def _pick(self, model: str, candidates: list[WorkerConnection], key: str | None = None) -> WorkerConnection:
        if not candidates:
            self.find_model(model)  # raises the right error: not ready, or no such model
            raise Unavailable(f"No ready worker serves '{model}'")
        if self.max_in_flight is not None and self.num_in_flight() >= self.max_in_flight:
            raise ServerBusy(
                f"Server is busy: {self.max_in_flight} requests in flight; retry shortly", headers={"Retry-After": "1"}
            )
        open_ = [w for w in candidates if w.num_in_flight < w.capacity]
        if not open_:
            raise ServerBusy("Server is busy: too many requests in flight; retry shortly", headers={"Retry-After": "1"})
        if self.router is None or key is None or len(open_) == 1:
            return min(open_, key=lambda w: w.num_in_flight / max(w.capacity, 1))
        for worker in open_:
            if self._instances.get(worker.address, worker.instance) != worker.instance:
                self.router.forget(worker.address)  # a new process: its cache starts empty
            self._instances[worker.address] = worker.instance
        chosen, why = self.router.choose(key, {w.address: w.num_in_flight for w in open_})
        self.metrics.routing_decisions.labels(why).inc()
        return next(w for w in open_ if w.address == chosen)
