"""Connections to workers: one DEALER socket each, a heartbeat, routing, and the in-flight table.

One reader task per worker fans incoming events out to per-request buffers (bounded: gateway/request_buffer.py).
A worker that stops answering heartbeats, or comes back as a new instance, fails every request that was waiting
on it. Whenever the gateway stops waiting for a request before its end — client gone, timeout, worker gone,
buffer overflow — it sends Abort, and it aborts any request the worker talks about that it no longer knows, so
nothing runs in a worker for nobody. Every event of every request passes through `generate()`, so that is where
the request metrics are taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.curve import CurveKeys
from common.protocol import (
    Abort,
    Delta,
    Done,
    Failed,
    Generate,
    Info,
    ModelCard,
    WorkerInfo,
    encode,
    to_gateway_decoder,
)
from gateway.errors import (
    BadRequest,
    ClientTooSlowError,
    ContextLengthExceeded,
    GatewayError,
    InternalError,
    ModelNotFound,
    ServerBusy,
    Unavailable,
)
from gateway.metrics import Metrics
from gateway.request_buffer import MAX_BYTES, RequestBuffer, WorkerGone

logger = logging.getLogger(__name__)

Event = Delta | Done | Failed
# Ids of finished or abandoned requests whose events still arrive, remembered so each is aborted once.
MAX_ORPHANS = 1024


def model_key(name: str) -> str:
    """Ollama clients say `name:latest`; both dialects match names case-insensitively."""
    name = name.strip().lower()
    return name.removesuffix(":latest")


# What the connection monitor listens for: a dead worker, and a worker that refuses our CURVE key.
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED


@dataclass(eq=False)
class WorkerConnection:
    address: str
    socket: zmq.asyncio.Socket
    info: WorkerInfo | None = None
    last_seen: float = 0.0  # monotonic time of the last message from this worker
    queues: dict[int, RequestBuffer] = field(default_factory=dict)
    orphans: OrderedDict[int, None] = field(default_factory=OrderedDict)  # unknown ids already sent an Abort
    instance: str = ""  # the last instance seen, kept while the worker is down, to count restarts
    restarts: int = 0
    refused: bool = False  # the last handshake failed (logged once, not once per reconnect)

    @property
    def is_ready(self) -> bool:
        return self.info is not None

    @property
    def num_in_flight(self) -> int:
        return len(self.queues)

    @property
    def capacity(self) -> int:
        if self.info is None:
            return 0
        return self.info.max_running + self.info.max_waiting

    def serves(self, model: str) -> bool:
        return self.info is not None and any(model_key(m.name) == model_key(model) for m in self.info.models)

    def fail_all(self, reason: str) -> None:
        if self.queues:
            logger.warning("worker %s: %s; failing %d request(s)", self.address, reason, len(self.queues))
        for queue in self.queues.values():
            queue.put(WorkerGone(reason))
        self.queues.clear()

    def send_now(self, frame: bytes) -> None:
        """Send without waiting: raises zmq.ZMQError (Again while the worker is not connected) at once. The
        asyncio socket tries a NOBLOCK send on the spot and hands back a finished future (and wakes its readers,
        which a send on a shadow socket would not)."""
        future = cast("asyncio.Future[None]", self.socket.send(frame, flags=zmq.NOBLOCK))
        if future.done():
            future.result()
        else:  # queued behind an earlier send: it goes when it can; its error must not be reported unretrieved
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def abandon(self, request_id: int) -> None:
        """Abort a request nobody waits for, once: its events still in flight are dropped without another Abort.
        Never waits: a worker that is not connected has nothing to abort, and a frozen one gets it on waking."""
        self.orphans[request_id] = None
        if len(self.orphans) > MAX_ORPHANS:
            self.orphans.popitem(last=False)
        with contextlib.suppress(zmq.ZMQError):
            self.send_now(encode(Abort(id=request_id)))


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
    ) -> None:
        self.context = context or zmq.asyncio.Context()
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.metrics = metrics or Metrics()
        self.max_in_flight = max_in_flight
        self.curve = curve
        self.buffer_bytes = buffer_bytes
        self.workers = [WorkerConnection(address, self._connect(address)) for address in addresses]
        for worker in self.workers:
            self.metrics.worker_down(worker.address)  # a series from the start: "down" is visible before "up"
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []

    def _connect(self, address: str) -> zmq.asyncio.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a worker that is not connected: a request must fail, not wait for a restart.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            self.curve.apply(socket)
        socket.connect(address)
        return socket

    async def start(self) -> None:
        for worker in self.workers:
            self._tasks.append(asyncio.create_task(self._read(worker), name=f"read {worker.address}"))
            self._tasks.append(asyncio.create_task(self._heartbeat(worker), name=f"beat {worker.address}"))
            self._tasks.append(asyncio.create_task(self._watch(worker), name=f"watch {worker.address}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in self.workers:
            worker.fail_all("gateway shutting down")
            worker.socket.close(linger=200)  # milliseconds for the last Aborts to leave
        self.context.term()

    # -- what the endpoints ask -------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return any(worker.is_ready for worker in self.workers)

    def models(self) -> list[ModelCard]:
        """Every model some ready worker serves, each once."""
        seen: dict[str, ModelCard] = {}
        for worker in self.workers:
            if worker.info is not None:
                for card in worker.info.models:
                    seen.setdefault(model_key(card.name), card)
        return list(seen.values())

    def find_model(self, name: str) -> ModelCard:
        if not self.is_ready:
            raise Unavailable("No model worker is ready yet; try again shortly", headers={"Retry-After": "1"})
        for card in self.models():
            if model_key(card.name) == model_key(name):
                return card
        raise ModelNotFound(name)

    async def ensure_loaded(self, name: str) -> ModelCard:
        """Make `name` ready to serve (seed 000's POST /api/v1/model/load). The model registry will start a worker
        for it here; until then this only checks that a ready worker serves it (503 if none is ready, 404 if no
        worker serves that name)."""
        return self.find_model(name)

    def num_in_flight(self) -> int:
        return sum(worker.num_in_flight for worker in self.workers)

    async def generate(self, request: Generate) -> AsyncIterator[Delta | Done]:
        """Send one request and yield its events until Done. Raises GatewayError on failure.

        Leaving the loop early (client gone, error, cancellation) sends Abort to the worker.
        """
        worker = self._pick(request.model)
        request = msgspec.structs.replace(request, id=next(self._ids))
        try:
            frame = encode(request)
        except (OverflowError, msgspec.EncodeError) as exc:  # the dialects range-check; this is the last guard
            raise BadRequest(f"A value in the request is out of range: {exc}") from None
        queue = RequestBuffer(max_bytes=self.buffer_bytes)
        worker.queues[request.id] = queue
        meter = self.metrics.meter(request.model)
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
                    raise _error_for(event)
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

    def _pick(self, model: str) -> WorkerConnection:
        candidates = [w for w in self.workers if w.serves(model)]
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
        return min(open_, key=lambda w: w.num_in_flight / max(w.capacity, 1))

    # -- background tasks -------------------------------------------------------------------

    async def _read(self, worker: WorkerConnection) -> None:
        while True:
            frame = await worker.socket.recv()
            try:
                message = to_gateway_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                logger.error("worker %s sent a malformed frame: %s", worker.address, exc)
                continue
            worker.last_seen = time.monotonic()
            if isinstance(message, WorkerInfo):
                self._on_info(worker, message)
                continue
            queue = worker.queues.get(message.id)
            if queue is None:
                self._orphan(worker, message)
            elif not queue.put(message, len(frame)):
                worker.queues.pop(message.id, None)  # overflowed: its reader gets the error, the worker an Abort
                logger.warning("request %d: the client reads too slowly; aborting it", message.id)
                worker.abandon(message.id)

    def _orphan(self, worker: WorkerConnection, event: Event) -> None:
        """An event for a request nobody waits for (any more): abort it, once, unless this was its end."""
        if isinstance(event, Done | Failed):
            worker.orphans.pop(event.id, None)
        elif event.id not in worker.orphans:
            worker.abandon(event.id)

    def _on_info(self, worker: WorkerConnection, info: WorkerInfo) -> None:
        if worker.info is None:
            logger.info("worker %s ready: %s on %s", worker.address, [m.name for m in info.models], info.device)
        elif worker.info.instance != info.instance:
            worker.fail_all("worker restarted")
            logger.info("worker %s is a new instance now", worker.address)
        if worker.instance and worker.instance != info.instance:
            worker.restarts += 1
            self.metrics.worker_restarts.labels(worker.address).set(worker.restarts)
        worker.instance = info.instance
        worker.info = info
        self.metrics.worker_info(worker.address, info)

    def _mark_down(self, worker: WorkerConnection, reason: str) -> None:
        worker.info = None
        worker.fail_all(reason)
        self.metrics.worker_down(worker.address)

    async def _heartbeat(self, worker: WorkerConnection) -> None:
        while True:
            with contextlib.suppress(zmq.ZMQError):  # EAGAIN while the worker is not connected
                worker.send_now(encode(Info()))
            await asyncio.sleep(self.heartbeat_interval)
            silent_for = time.monotonic() - worker.last_seen
            if worker.info is not None and silent_for > self.dead_after:
                logger.warning("worker %s silent for %.1fs: marking it down", worker.address, silent_for)
                self._mark_down(worker, "worker stopped answering")

    async def _watch(self, worker: WorkerConnection) -> None:
        """A dropped connection means the worker process died: fail its requests now, not at the next beat.
        A failed handshake means the worker refused our CURVE key (or we have the wrong one for it)."""
        monitor = worker.socket.get_monitor_socket(_WATCHED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    if worker.info is not None:
                        logger.warning("worker %s disconnected: marking it down", worker.address)
                    self._mark_down(worker, "worker disconnected")
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    worker.refused = False
                elif event & _HANDSHAKE_FAILED and not worker.refused:
                    worker.refused = True
                    logger.error("worker %s: the security handshake failed; check the CURVE keys", worker.address)
        finally:
            worker.socket.disable_monitor()
            monitor.close(linger=0)


def _error_for(failed: Failed) -> GatewayError:
    match failed.code:
        case "bad_request":
            return BadRequest(failed.message)
        case "context_length":
            return ContextLengthExceeded(failed.message, param="messages")
        case "not_found":
            return ModelNotFound(failed.message)
        case "busy":
            return ServerBusy(failed.message, headers={"Retry-After": "1"})
        case "unavailable":
            return Unavailable(failed.message, headers={"Retry-After": "1"})
        case _:
            return InternalError(failed.message)
