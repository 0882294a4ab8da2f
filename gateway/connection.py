"""One worker's connection: its DEALER socket, what it last said about itself, and the requests waiting on it.

A worker that dies fails every request waiting on it at once (`fail_all`); a request nobody waits for any more is
aborted in the worker, once (`abandon`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

import zmq
import zmq.asyncio

from common.protocol import Abort, WorkerInfo, encode
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
    info: WorkerInfo | None = None
    last_seen: float = 0.0  # monotonic time of the last message from this worker
    queues: dict[int, RequestBuffer] = field(default_factory=dict)
    orphans: OrderedDict[int, None] = field(default_factory=OrderedDict)  # unknown ids already sent an Abort
    instance: str = ""  # the last instance seen, kept while the worker is down, to count restarts
    restarts: int = 0
    refused: bool = False  # the last handshake failed (logged once, not once per reconnect)
    ever_ready: bool = False  # has answered a heartbeat since the gateway connected
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # its reader, heartbeat and monitor

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
