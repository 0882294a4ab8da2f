"""The worker's socket loop: a ROUTER socket served by an I/O thread, the engine stepping on the main thread.

The I/O thread decodes frames, answers Info heartbeats at once (even during a long step), and hands
Generate/Abort to the engine through a queue; the engine sends its events back through an inproc socket.
Socket I/O never waits on the model, and the model never waits on a slow socket.

Between hosts (tcp://) the socket speaks CURVE: encrypted, and only gateways whose public key is in the
authorized folder get in. Over ipc:// the socket file is readable by its owner only.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from common.curve import ServerCurve
from common.protocol import Abort, Generate, Info, encode, to_worker_decoder

if TYPE_CHECKING:  # the engine imports torch; this module stays light (tests serve a scripted engine)
    from worker.engine import Engine, Outgoing

logger = logging.getLogger(__name__)

OUTBOX = "inproc://tandem-outbox"
SEND_TIMEOUT_MS = 200  # how often a send to the I/O thread looks up whether that thread is still there


@dataclass(frozen=True)
class PeerGone:
    """Posted to the engine when a gateway can no longer be reached."""


Inbound = tuple[bytes, Generate | Abort | PeerGone]


class WorkerServer:
    def __init__(self, engine: Engine, bind: str, curve: ServerCurve | None = None) -> None:
        self.engine = engine
        self.bind = bind
        self.curve = curve
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
                self._drain_inbox(outbox, block=not self.engine.has_work())  # 1) new requests, aborts
                if self.engine.has_work():
                    self._send(outbox, self.engine.step())  # 2) schedule, run, send deltas
                    self.info = encode(self.engine.info())
            if not self.stopping.is_set():
                raise RuntimeError(f"the socket thread on {self.bind} stopped")
        finally:
            outbox.close(linger=1000)
            io_thread.join(timeout=2)
            self.context.term()

    def stop(self) -> None:
        self.stopping.set()

    def _drain_inbox(self, outbox: zmq.Socket, *, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            peer, message = item
            match message:
                case Generate():
                    self._send(outbox, self.engine.add(peer, message))
                case Abort(id=request_id):
                    self._send(outbox, self.engine.abort(peer, request_id))
                case PeerGone():
                    self.engine.abort_peer(peer)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        self.info = encode(self.engine.info())

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
            while not self.stopping.is_set():
                ready = dict(poller.poll(timeout=100))
                if router in ready:
                    self._receive(router)
                if pull in ready:
                    self._forward(router, pull)
        except Exception:
            logger.exception("the socket thread on %s failed", self.bind)  # run() sees it gone and stops
        finally:
            router.close(linger=0)
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
            try:
                message = to_worker_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                logger.warning("dropped a malformed frame from %s: %s", peer.hex(), exc)
                continue
            if isinstance(message, Info):
                self._route(router, peer, self.info)
            else:
                self.inbox.put((peer, message))

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
                self.inbox.put((peer, PeerGone()))
