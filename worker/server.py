"""The worker's socket loop: a ROUTER socket served by an I/O thread, the engine stepping on the main thread.

The I/O thread decodes frames, answers Info heartbeats at once (even during a long step), and hands
Generate/Abort to the engine through a queue; the engine sends its events back through an inproc socket.
Socket I/O never waits on the model, and the model never waits on a slow socket. A request goes from the
engine to its intake thread and comes back through the same queue, ready to schedule.

Every request that reaches the worker ends with exactly one Done or Failed: a frame that does not decode is
answered with Failed when its id can be read; a gateway that vanishes or stays silent past `peer_timeout`
has its requests aborted (and told so, should it wake up); a step that fails ends the requests it ran; an engine that
raises while taking one request in fails that request alone.

Between hosts (tcp://) the socket speaks CURVE: encrypted, and only gateways whose public key is in the
authorized folder get in. Over ipc:// the socket file is readable by its owner only.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, assert_never

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from common.curve import ServerCurve
from common.protocol import Abort, Embed, Failed, Generate, Info, LoadAdapter, UnloadAdapter, encode, to_worker_decoder
from worker.lora_slots import AdapterRead
from worker.sequence import Prepared

if TYPE_CHECKING:  # the engines import torch; this module stays light (tests serve a scripted engine)
    from worker.embedder import Embedder
    from worker.engine import Engine, Outgoing

logger = logging.getLogger(__name__)

OUTBOX = "inproc://tandem-outbox"
SEND_TIMEOUT_MS = 200  # how often a send to the I/O thread looks up whether that thread is still there
# Gateways send a heartbeat every 0.5 s; one silent this long is gone or frozen, and its requests are aborted.
DEFAULT_PEER_TIMEOUT = 10.0


@dataclass(frozen=True)
class PeerGone:
    """Posted to the engine when a gateway can no longer be reached, or has not been heard from for too long."""

    reason: str


Message = Generate | Embed | Abort | PeerGone | Prepared | LoadAdapter | UnloadAdapter | AdapterRead
Inbound = tuple[bytes, Message]


class WorkerServer:
    def __init__(
        self,
        engine: Engine | Embedder,
        bind: str,
        curve: ServerCurve | None = None,
        peer_timeout: float = DEFAULT_PEER_TIMEOUT,
    ) -> None:
        self.engine = engine
        self.bind = bind
        self.curve = curve
        self.peer_timeout = peer_timeout
        self._last_heard: dict[bytes, float] = {}  # gateway → monotonic time of its last frame; I/O thread only
        self.context = zmq.Context()
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.stopping = threading.Event()
        self._io_thread = threading.Thread(target=self._serve_socket, name="worker-io", daemon=True)
        self.info = encode(engine.info())  # the latest self-description, refreshed after every step
        self._outbox_ready = threading.Event()
        self._unreachable: set[bytes] = set()  # gateways whose sends failed; touched by the I/O thread only

    def run(self) -> None:
        """Serve until stop() is called. The engine loop fits on a screen."""
        io_thread = self._io_thread
        io_thread.start()
        while not self._outbox_ready.wait(0.1):
            if not io_thread.is_alive():  # bind failed (address in use, bad key…): its error is logged
                self.context.term()
                raise RuntimeError(f"could not serve on {self.bind}")
        outbox = self.context.socket(zmq.PUSH)
        outbox.setsockopt(zmq.SNDHWM, 0)  # the I/O thread forwards as fast as the router takes them
        # A PUSH with no peer blocks on send: once stop() lets the I/O thread close its end, a step's events
        # would hang shutdown for good (seen: killed after 10 s when SIGTERM came mid-step at 64 streams).
        outbox.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        outbox.connect(OUTBOX)
        try:
            while not self.stopping.is_set() and io_thread.is_alive():
                self._drain_inbox(outbox, block=not self.engine.has_work())  # 1) new requests, ready ones, aborts
                if self.engine.has_work():
                    self._send(outbox, self._step(outbox))  # 2) schedule, run, sample, send deltas
                    self.info = encode(self.engine.info())
            if not self.stopping.is_set():
                raise RuntimeError(f"the socket thread on {self.bind} stopped")
        finally:
            self.engine.close()
            outbox.close(linger=1000)
            self.stopping.set()  # the I/O thread forwards what is still queued (a failing engine's Faileds), then ends
            io_thread.join(timeout=2)
            self.context.term()

    def _step(self, outbox: zmq.Socket) -> list[Outgoing]:
        """One engine step. If the engine's state can no longer be trusted, every request it holds fails (the
        events still go out) and the error propagates: the worker exits and its supervisor restarts it."""
        try:
            return self.engine.step()
        except Exception as exc:
            logger.critical("the engine failed and cannot go on: %r", exc)
            try:
                self._send(outbox, self.engine.fail_everything(f"the model worker failed and restarts: {exc!r}"))
            except Exception:
                logger.exception("could not fail the engine's requests; the gateways will see the worker go")
            raise

    def stop(self) -> None:
        self.stopping.set()

    def _drain_inbox(self, outbox: zmq.Socket, *, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            peer, message = item
            try:
                events = self._handle(peer, message)
            except Exception as exc:
                request = _request_of(peer, message)
                if request is None:
                    raise  # an abort or an adapter change half done: the engine's books are unknown, restart
                logger.exception("request %d: the engine failed on it; failing it alone", request[1])
                failed = Failed(id=request[1], code="internal", message=f"the worker failed on this request: {exc}")
                events = [(request[0], failed)]
            self._send(outbox, events)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        self.info = encode(self.engine.info())

    def _handle(self, peer: bytes, message: Message) -> list[Outgoing]:
        match message:
            case Generate():
                return self.engine.add(peer, message, ready=functools.partial(self._ready, peer))
            case Embed():
                return self.engine.embed(peer, message)
            case Prepared():
                return self.engine.admit(message)
            case Abort(id=request_id):
                return self.engine.abort(peer, request_id)
            case PeerGone(reason=reason):
                return self.engine.abort_peer(peer, reason)
            case LoadAdapter():
                return self.engine.load_adapter(peer, message, functools.partial(self._ready, peer))
            case AdapterRead():
                return self.engine.adapter_read(peer, message)
            case UnloadAdapter():
                return self.engine.unload_adapter(peer, message)
            case _:
                assert_never(message)

    def _ready(self, peer: bytes, prepared: Prepared | AdapterRead) -> None:
        """Called on the intake thread: back to the engine loop, through the queue everything else takes."""
        self.inbox.put((peer, prepared))

    def _send(self, outbox: zmq.Socket, events: list[Outgoing]) -> None:
        for peer, message in events:
            while True:
                try:
                    outbox.send_multipart([peer, encode(message)])
                    break
                except zmq.Again:  # only once the I/O thread has stopped reading: nothing left to send to
                    if self.stopping.is_set() or not self._io_thread.is_alive():
                        return

    def _secure(self, router: zmq.Socket) -> ThreadAuthenticator | None:
        """CURVE server on `router`, with a ZAP handler that checks each gateway's key; started before bind,
        since a CURVE socket without a ZAP handler lets every key in."""
        if self.curve is None:
            if self.bind.startswith("tcp://"):
                logger.warning("serving %s without CURVE: anyone who reaches the port can use the model", self.bind)
            return None
        authenticator = ThreadAuthenticator(self.context, log=logging.getLogger("worker.zap"))
        authenticator.start()
        authenticator.configure_curve_callback(domain="*", credentials_provider=self.curve)
        router.curve_server = True
        router.curve_publickey = self.curve.public
        router.curve_secretkey = self.curve.secret
        return authenticator

    def _serve_socket(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished gateway raises instead of dropping
        router.setsockopt(zmq.SNDHWM, 0)  # never drop a token because one gateway reads slowly
        pull = self.context.socket(zmq.PULL)
        authenticator = None
        try:
            authenticator = self._secure(router)
            router.bind(self.bind)
            if self.bind.startswith("ipc://"):
                os.chmod(self.bind.removeprefix("ipc://"), 0o600)  # only this user may talk to the model
            pull.bind(OUTBOX)
            self._outbox_ready.set()
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(pull, zmq.POLLIN)
            logger.info("worker listening on %s", self.bind)
            next_reap = time.monotonic() + 1.0
            while not self.stopping.is_set():
                ready = dict(poller.poll(timeout=100))
                if router in ready:
                    self._receive(router)
                if pull in ready:
                    self._forward(router, pull)
                if time.monotonic() >= next_reap:
                    self._reap_silent_peers()
                    next_reap = time.monotonic() + 1.0
            self._forward(router, pull)  # the last events the engine queued before it stopped
        except Exception:
            logger.exception("the socket thread on %s failed", self.bind)  # run() sees it gone and stops
        finally:
            router.close(linger=500)  # long enough for those last events to leave
            pull.close(linger=0)
            if authenticator is not None:
                authenticator.stop()

    def _receive(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                logger.warning("dropped a message of %d frames (expected 2)", len(frames))
                continue
            peer, frame = frames
            self._unreachable.discard(peer)  # it is back
            self._last_heard[peer] = time.monotonic()
            try:
                message = to_worker_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                self._refuse(router, peer, frame, exc)
                continue
            if isinstance(message, Info):
                self._route(router, peer, self.info)
            else:
                self.inbox.put((peer, message))

    def _refuse(self, router: zmq.Socket, peer: bytes, frame: bytes, exc: Exception) -> None:
        """A frame that does not decode as a message: answer Failed if it names a request, so nobody waits."""
        request_id = _request_id_of(frame)
        logger.warning("malformed frame from %s (request id %s): %s", peer.hex(), request_id, exc)
        if request_id is not None:
            failed = Failed(id=request_id, code="bad_request", message=f"the worker could not read this request: {exc}")
            self._route(router, peer, encode(failed))

    def _reap_silent_peers(self) -> None:
        """A gateway that has sent nothing (not even a heartbeat) for `peer_timeout` is gone or frozen."""
        now = time.monotonic()
        for peer, heard in list(self._last_heard.items()):
            if now - heard > self.peer_timeout:
                del self._last_heard[peer]
                logger.warning("gateway %s silent for %.0fs: aborting its requests", peer.hex(), now - heard)
                self.inbox.put((peer, PeerGone(f"the worker heard nothing from its gateway for {now - heard:.0f}s")))

    def _forward(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        while True:
            try:
                peer, payload = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._route(router, peer, payload)

    def _route(self, router: zmq.Socket, peer: bytes, payload: bytes) -> None:
        try:
            router.send_multipart([peer, payload])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if peer not in self._unreachable:  # its queued events fail too: say it and free its work once
                self._unreachable.add(peer)
                logger.warning("gateway %s unreachable: aborting its requests", peer.hex())
                self.inbox.put((peer, PeerGone("the gateway disconnected")))


def _request_of(peer: bytes, message: Message) -> tuple[bytes, int] | None:
    """The one request a message stands for, if it stands for one: a failure handling it fails that request alone."""
    match message:
        case Generate(id=request_id) | Embed(id=request_id):
            return peer, request_id
        case Prepared(key=key):
            return key
    return None


def _request_id_of(frame: bytes) -> int | None:
    """The id of a Generate or Abort frame that failed typed decoding, if it can be read at all."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    request_id = raw.get("id") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, int) and 0 <= request_id < 2**63 else None
