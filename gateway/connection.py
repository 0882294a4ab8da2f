"""One worker's connection: its DEALER socket, what it last said about itself, the requests waiting on it, and
its background tasks — the reader fanning events out to those requests, the heartbeat, the connection monitor.

A worker that dies fails every request waiting on it at once (`fail_all`); a request nobody waits for any more is
aborted in the worker, once (`abandon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.protocol import Abort, Done, Embeddings, Failed, Info, WorkerInfo, encode, to_gateway_decoder
from gateway.errors import (
    BadRequest,
    ContextLengthExceeded,
    GatewayError,
    InternalError,
    ModelNotFound,
    ServerBusy,
    Unavailable,
)
from gateway.metrics import Metrics
from gateway.registry import model_key
from gateway.request_buffer import RequestBuffer, WorkerGone

logger = logging.getLogger("gateway.workers")

# Ids of finished or abandoned requests whose events still arrive, remembered so each is aborted once.
MAX_ORPHANS = 1024


# What the connection monitor listens for: a dead worker, and a worker that refuses our CURVE key.
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED


@dataclass(eq=False)
class WorkerConnection:
    address: str
    socket: zmq.asyncio.Socket
    # Its monitor, attached before the socket connects (workers.py): attached later, by watch(), it missed whatever
    # happened first, once a refused handshake, so the gateway never said why it could not reach the worker.
    monitor: zmq.asyncio.Socket | None = None
    info: WorkerInfo | None = None
    last_seen: float = 0.0  # monotonic time of the last message from this worker
    queues: dict[int, RequestBuffer] = field(default_factory=dict)
    orphans: OrderedDict[int, None] = field(default_factory=OrderedDict)  # unknown ids already sent an Abort
    instance: str = ""  # the last instance seen, kept while the worker is down, to count restarts
    restarts: int = 0
    refused: bool = False  # the last handshake failed (logged once, not once per reconnect)
    ever_ready: bool = False  # has answered a heartbeat since the gateway connected
    draining: bool = False  # discovery lost it: no new requests; dropped once those in flight are done
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # its reader, heartbeat and monitor
    metrics: Metrics = field(default_factory=Metrics)
    on_ready: Callable[[], None] = lambda: None  # called when it turns ready (the pool wakes waiting requests)

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

    # -- its background tasks (started by the pool) ---------------------------------------

    async def read(self) -> None:
        while True:
            frame = await self.socket.recv()
            try:
                message = to_gateway_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                logger.error("worker %s sent a malformed frame: %s", self.address, exc)
                continue
            self.last_seen = time.monotonic()
            if isinstance(message, WorkerInfo):
                self._on_info(message)
                continue
            queue = self.queues.get(message.id)
            if queue is None:
                self._orphan(message)
            elif not queue.put(message, len(frame)):
                self.queues.pop(message.id, None)  # overflowed: its reader gets the error, the worker an Abort
                logger.warning("request %d: the client reads too slowly; aborting it", message.id)
                self.abandon(message.id)

    def _orphan(self, event: Any) -> None:
        """An event for a request nobody waits for (any more): abort it, once, unless this was its end."""
        if isinstance(event, Done | Failed | Embeddings):
            self.orphans.pop(event.id, None)
        elif event.id not in self.orphans:
            self.abandon(event.id)

    def _on_info(self, info: WorkerInfo) -> None:
        if self.info is None:
            logger.info("worker %s ready: %s on %s", self.address, [m.name for m in info.models], info.device)
        elif self.info.instance != info.instance:
            self.fail_all("worker restarted")
            logger.info("worker %s is a new instance now", self.address)
        if self.instance and self.instance != info.instance:
            self.restarts += 1
            self.metrics.worker_restarts.labels(self.address).set(self.restarts)
        was_ready = self.info is not None
        self.instance = info.instance
        self.info = info
        self.metrics.worker_info(self.address, info)
        if not was_ready:
            self.ever_ready = True
            self.on_ready()

    def mark_down(self, reason: str) -> None:
        """Not ready until it answers again; every request waiting on it fails now."""
        self.info = None
        self.fail_all(reason)
        self.metrics.worker_down(self.address)

    async def heartbeat(self, interval: float, dead_after: float) -> None:
        while True:
            with contextlib.suppress(zmq.ZMQError):  # EAGAIN while the worker is not connected
                self.send_now(encode(Info()))
            await asyncio.sleep(interval)
            silent_for = time.monotonic() - self.last_seen
            if self.info is not None and silent_for > dead_after:
                logger.warning("worker %s silent for %.1fs: marking it down", self.address, silent_for)
                self.mark_down("worker stopped answering")

    async def watch(self) -> None:
        """A dropped connection means the worker process died: fail its requests now, not at the next beat.
        A failed handshake means the worker refused our CURVE key (or we have the wrong one for it)."""
        monitor = self.monitor
        assert monitor is not None, "WorkerPool attaches it before connecting"
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    if self.info is not None:
                        logger.warning("worker %s disconnected: marking it down", self.address)
                    self.mark_down("worker disconnected")
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.refused = False
                elif event & HANDSHAKE_FAILED and not self.refused:
                    self.refused = True
                    logger.error("worker %s: the security handshake failed; check the CURVE keys", self.address)
        finally:
            self.close_monitor()

    def close_monitor(self) -> None:
        """Stop watching, once: when watch() ends, or at removal for a connection whose watch never ran."""
        if self.monitor is not None and not self.monitor.closed:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)


def error_for(failed: Failed) -> GatewayError:
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
