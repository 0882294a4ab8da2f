"""The gateway's WorkerPool against a worker played by hand on a real ROUTER socket: whenever the gateway stops
waiting for a request it tells the worker (Abort), and a client that reads slowly costs bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from test_ops_harness import ipc_address

from common.protocol import (
    Abort,
    Delta,
    Done,
    Generate,
    Info,
    ModelCard,
    Usage,
    WorkerInfo,
    encode,
    to_worker_decoder,
)
from gateway.errors import ClientTooSlowError, Unavailable
from gateway.request_buffer import RequestBuffer, merge
from gateway.workers import WorkerPool

pytestmark = pytest.mark.anyio
CARD = ModelCard(name="m", context_length=64, vocab_size=100)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class HandWorker:
    """A worker socket whose every answer the test decides. It answers heartbeats while `alive`."""

    def __init__(self, context: zmq.asyncio.Context, address: str) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.bind(address)
        self.alive = True
        self.peer = b""
        self.models = [CARD]  # what it describes itself as serving, at every heartbeat
        self.generates: list[Generate] = []
        self.aborts: list[int] = []
        self.got_generate = asyncio.Event()
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            self.peer, frame = await self.socket.recv_multipart()
            message = to_worker_decoder.decode(frame)
            if isinstance(message, Info) and self.alive:
                info = WorkerInfo("x", 1, self.models, "cpu", started_at=0, max_running=8, max_waiting=8)
                await self.socket.send_multipart([self.peer, encode(info)])
            elif isinstance(message, Generate):
                self.generates.append(message)
                self.got_generate.set()
            elif isinstance(message, Abort):
                self.aborts.append(message.id)

    async def send(self, event: Any) -> None:
        await self.socket.send_multipart([self.peer, encode(event)])

    def close(self) -> None:
        self.task.cancel()
        self.socket.close(linger=0)


@contextlib.asynccontextmanager
async def pool_and_worker(**options: Any) -> AsyncIterator[tuple[WorkerPool, HandWorker]]:
    address = ipc_address()
    context = zmq.asyncio.Context()
    worker = HandWorker(context, address)
    pool = WorkerPool([address], context=context, heartbeat_interval=0.05, **options)
    await pool.start()
    try:
        while not pool.is_ready:
            await asyncio.sleep(0.01)
        yield pool, worker
    finally:
        worker.close()
        await pool.close()


async def until(predicate: Any) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


def generate() -> Generate:
    return Generate(id=0, model="m", prompt="hi")


async def test_a_worker_that_goes_silent_fails_its_requests_and_is_sent_abort() -> None:
    async with pool_and_worker(dead_after=0.5) as (pool, worker):
        stream = pool.generate(generate())
        first = asyncio.create_task(anext(stream))
        await worker.got_generate.wait()
        worker.alive = False  # frozen: no heartbeats, no events; its socket still reads (and keeps) what comes
        with pytest.raises(Unavailable):
            await first
        await until(lambda: worker.aborts)
        assert worker.aborts == [worker.generates[0].id]


async def test_events_for_a_request_nobody_waits_for_are_aborted_once() -> None:
    async with pool_and_worker() as (pool, worker):
        await worker.socket.send_multipart([worker.peer, b""])  # (a frame the pool cannot read: logged, skipped)
        for _ in range(3):
            await worker.send(Delta(id=999, text="x"))
        await worker.send(Done(id=998, finish_reason="stop", usage=Usage(1, 1)))  # an end: nothing to abort
        await worker.send(Delta(id=997, text="x"))  # a barrier: the pool reads and aborts in order, so any second
        await until(lambda: 997 in worker.aborts)  # Abort for 999 (or one for 998) would have come before this one
        assert worker.aborts == [999, 997]


async def test_a_client_that_reads_slowly_holds_bounded_memory_then_is_given_up() -> None:
    async with pool_and_worker(buffer_bytes=40_000) as (pool, worker):
        stream = pool.generate(generate())
        first = asyncio.create_task(anext(stream))
        await worker.got_generate.wait()
        request_id = worker.generates[0].id
        for i in range(200):  # ~100 bytes each: merged past 64 events, under the byte limit
            await worker.send(Delta(id=request_id, text=f"{i:>60} ", num_output_tokens=i + 1))
        assert isinstance(await first, Delta)
        queue = pool.workers[0].queues[request_id]
        await until(lambda: queue.items and queue.items[-1][0].num_output_tokens == 200)  # type: ignore[union-attr]
        assert len(queue) <= 64  # the deltas past 64 merged into the last one held
        held = [await anext(stream) for _ in range(len(queue))]
        assert "".join(e.text for e in held if isinstance(e, Delta)) == "".join(f"{i:>60} " for i in range(1, 200))
        for i in range(600):  # now nobody reads: over 40,000 bytes the request is given up
            await worker.send(Delta(id=request_id, text=f"{i:>60} ", num_output_tokens=201 + i))
        await until(lambda: worker.aborts)
        with pytest.raises(ClientTooSlowError):
            await anext(stream)
        assert worker.aborts == [request_id]


def test_merged_deltas_are_one_delta_with_everything() -> None:
    a = Delta(id=1, text="Hel", reasoning="r1", num_output_tokens=1)
    b = Delta(id=1, text="lo", num_prompt_tokens=5, num_output_tokens=2)
    merged = merge(a, b)
    assert (merged.text, merged.reasoning, merged.num_output_tokens, merged.num_prompt_tokens) == ("Hello", "r1", 2, 5)
    buffer = RequestBuffer(max_events=2, max_bytes=10**6)
    for event in (a, b, a, Done(id=1, finish_reason="stop", usage=Usage(5, 3)), b):
        buffer.put(event, size=10)
    kinds = [type(item[0]).__name__ for item in buffer.items]
    assert kinds == ["Delta", "Delta", "Done", "Delta"]  # merged only into a delta, never past the end
    assert msgspec.structs.asdict(buffer.items[1][0])["text"] == "loHel"
