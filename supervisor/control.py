"""The supervisor's control socket: a ZeroMQ ROUTER on an ipc:// address the launcher hands to its gateways.

Each `turn()` takes in what the gateways sent (Beat, Use, Load, Unload, AddAdapter, RemoveAdapter), lets the registry
decide (`tick`), sends the answers, and publishes the Registry to every gateway when it changed. Answers to the
launcher's own requests (peer b"": the model loaded at start) are kept in `own`.
"""

from __future__ import annotations

import logging
import os

import msgspec
import zmq

from common.control import AddAdapter, Answer, Beat, Load, RemoveAdapter, Unload, Use, encode, to_supervisor_decoder
from supervisor.registry import ModelManager

logger = logging.getLogger("launcher")


class ControlServer:
    def __init__(self, manager: ModelManager, address: str, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.manager = manager
        self.address = address
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)
        if address.startswith("ipc://"):
            os.chmod(address.removeprefix("ipc://"), 0o600)  # only this user's gateways
        self.published = manager.version
        self.own: dict[int, Answer] = {}

    def turn(self, timeout_ms: int) -> None:
        if self.router.poll(timeout_ms, zmq.POLLIN):
            self._receive()
        self.manager.tick()
        for (peer, request_id), answer in self.manager.answers:
            if peer:
                self._send(peer, encode(answer))
            else:
                self.own[request_id] = answer
        self.manager.answers.clear()
        if self.manager.version != self.published:
            self.published = self.manager.version
            for peer, gateway in self.manager.gateways.items():
                self._send(peer, encode(self.manager.state(gateway.catalog != self.manager.catalog_version)))

    def _receive(self) -> None:
        while True:
            try:
                peer, frame = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                continue
            try:
                message = to_supervisor_decoder.decode(frame)
            except msgspec.DecodeError as exc:
                logger.warning("malformed control frame from %s: %s", peer.hex(), exc)
                continue
            match message:
                case Beat():
                    if self.manager.beat(peer, message):
                        stale_catalog = message.catalog != self.manager.catalog_version
                        self._send(peer, encode(self.manager.state(stale_catalog)))
                case Use(model=model, keep_alive=keep_alive):
                    self.manager.use(model, keep_alive)
                case Load(id=request_id, model=model, keep_alive=keep_alive):
                    self.manager.load((peer, request_id), model, keep_alive)
                case Unload(id=request_id, model=model):
                    self.manager.unload((peer, request_id), model)
                case AddAdapter(id=request_id, name=name, path=path, base=base):
                    self.manager.add_adapter((peer, request_id), name, path, base)
                case RemoveAdapter(id=request_id, name=name):
                    self.manager.remove_adapter((peer, request_id), name)

    def _send(self, peer: bytes, frame: bytes) -> None:
        try:
            self.router.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a gateway gone or not reading: it asks again with its next beat
            logger.debug("control: could not send to %s: %s", peer.hex(), exc)

    def close(self) -> None:
        self.router.close(linger=0)
