"""WorkerServer's own loop: stopping at an awkward moment, frames it cannot read, gateways that go silent, and an
engine that breaks — each request still ends exactly once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import zmq
from test_ops_harness import MODEL, ScriptedEngine, ipc_address, serve_worker

from common.protocol import Delta, Done, Failed, Generate, encode, to_gateway_decoder
from worker.server import WorkerServer


class StoppedMidStep(ScriptedEngine):
    """SIGTERM lands while a step runs: the step still returns a batch of events to send."""

    def __init__(self) -> None:
        super().__init__()
        self.server: WorkerServer | None = None

    def has_work(self) -> bool:
        return True

    def step(self) -> list[tuple[bytes, Any]]:
        assert self.server is not None
        self.server.stop()
        self.server._io_thread.join(10)  # the I/O thread has noticed and closed its end
        return [(b"gone", Delta(id=i, text="x")) for i in range(2000)]


def test_stop_during_a_step_with_events_left_to_send_still_returns() -> None:
    engine = StoppedMidStep()
    server = engine.server = WorkerServer(engine, ipc_address())  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "run() hung on sending to an I/O thread that had already stopped"


@contextlib.contextmanager
def dealer(address: str) -> Iterator[zmq.Socket]:
    """A bare gateway: one DEALER socket speaking the protocol by hand."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        yield socket
    finally:
        socket.close()
        context.term()


def receive(socket: zmq.Socket, timeout_ms: int = 10_000) -> Any:
    assert socket.poll(timeout_ms), "no answer from the worker"
    return to_gateway_decoder.decode(socket.recv())


def test_a_frame_that_does_not_decode_is_answered_when_its_id_can_be_read() -> None:
    address = ipc_address()
    engine = ScriptedEngine()
    with serve_worker(engine, address), dealer(address) as gateway:
        gateway.send(msgspec.msgpack.encode({"type": "Generate", "id": 7, "model": ["not", "a", "string"]}))
        failed = receive(gateway)
        gateway.send(b"\xc1 not msgpack at all")  # no id to answer: logged, and the worker goes on
        gateway.send(encode(Generate(id=8, model=MODEL, prompt="hi")))
        events = [receive(gateway) for _ in range(6)]
    assert isinstance(failed, Failed) and failed.id == 7 and failed.code == "bad_request"
    assert [type(e) for e in events] == [Delta] * 5 + [Done] and all(e.id == 8 for e in events)
    assert [r.id for r in engine.received] == [8]


def test_a_silent_gateway_has_its_requests_aborted_and_is_told_why() -> None:
    address = ipc_address()
    engine = ScriptedEngine(num_tokens=100_000)
    server = WorkerServer(engine, address, peer_timeout=1.0)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with dealer(address) as gateway:
            gateway.send(encode(Generate(id=3, model=MODEL, prompt="hi")))  # then nothing, not even a heartbeat
            ends = []
            while not ends:
                event = receive(gateway)
                ends = [event] if isinstance(event, Failed | Done) else []
    finally:
        server.stop()
        thread.join(10)
    assert isinstance(ends[0], Failed) and ends[0].id == 3 and ends[0].code == "unavailable"
    assert engine.aborted == [3] and not engine.has_work()


class BreaksOnOneRequest(ScriptedEngine):
    def add(self, peer: bytes, request: Generate, ready: Any = None) -> list[tuple[bytes, Any]]:
        if request.prompt == "bug":
            raise KeyError("simulated engine bug")
        return super().add(peer, request, ready)


def test_an_engine_that_raises_on_one_request_fails_it_alone() -> None:
    address = ipc_address()
    engine = BreaksOnOneRequest()
    with serve_worker(engine, address), dealer(address) as gateway:
        for request_id, prompt in ((1, "hi"), (2, "bug"), (3, "hi")):
            gateway.send(encode(Generate(id=request_id, model=MODEL, prompt=prompt)))
        events: dict[int, list[Any]] = {1: [], 2: [], 3: []}
        while sum(isinstance(e, Done | Failed) for batch in events.values() for e in batch) < 3:
            event = receive(gateway)
            events[event.id].append(event)
    assert [type(e) for e in events[2]] == [Failed]
    assert events[2][0].code == "internal" and "simulated engine bug" in events[2][0].message
    assert [type(e) for e in events[1]] == [type(e) for e in events[3]] == [Delta] * 5 + [Done]  # the worker went on


class BreaksOnStep(ScriptedEngine):
    def step(self) -> list[tuple[bytes, Any]]:
        if self.running:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().step()


def test_a_broken_engine_fails_every_request_then_the_worker_exits() -> None:
    address = ipc_address()
    engine = BreaksOnStep(max_running=1)
    server = WorkerServer(engine, address)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as exc:
            errors.append(exc)

    with dealer(address) as gateway:
        gateway.send(encode(Generate(id=1, model=MODEL, prompt="hi")))  # one runs, one waits (max_running=1)
        gateway.send(encode(Generate(id=2, model=MODEL, prompt="hi")))
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        ends: list[Any] = []
        while len(ends) < 2:
            event = receive(gateway)
            ends += [event] if isinstance(event, Done | Failed) else []
        thread.join(10)
    assert sorted(e.id for e in ends) == [1, 2] and all(isinstance(e, Failed) for e in ends)
    assert not thread.is_alive()
    assert errors and "illegal memory access" in str(errors[0])
