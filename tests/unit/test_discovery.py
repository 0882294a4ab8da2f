"""Workers that join and leave at run time (gateway/discovery.py, gateway/membership.py): DNS answers become worker
addresses; a worker discovery loses is drained — no new requests, those in flight finish or fail cleanly — then
dropped, with its metric series; one that comes back takes requests again. Against workers played by hand on real
ROUTER sockets (tests/unit/test_pool.py's HandWorker)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq.asyncio
from test_ops_harness import ipc_address
from test_pool import HandWorker, generate, until

from common.protocol import Delta, Done, Usage
from gateway import __main__ as gateway_main
from gateway.discovery import DnsDiscovery, parse_host_port
from gateway.errors import Unavailable
from gateway.workers import WorkerPool
from supervisor import config as launcher_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- DNS ----------------------------------------------------------------------------------------


def answers(*ips: str) -> Any:
    async def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

    return resolver


def failing(errno: int) -> Any:
    async def resolver(host: str, port: int) -> list[tuple[Any, ...]]:
        raise socket.gaierror(errno, "test")

    return resolver


async def test_a_name_resolves_to_one_worker_per_address() -> None:
    dns = DnsDiscovery("tandem-workers:5555", resolver=answers("10.0.0.7", "10.0.0.8", "10.0.0.7", "fd00::3"))
    assert await dns.resolve() == {"tcp://10.0.0.7:5555", "tcp://10.0.0.8:5555", "tcp://[fd00::3]:5555"}


async def test_no_such_name_is_no_workers_but_a_failing_lookup_keeps_them() -> None:
    assert await DnsDiscovery("gone:5555", resolver=failing(socket.EAI_NONAME)).resolve() == set()
    assert await DnsDiscovery("flaky:5555", resolver=failing(socket.EAI_AGAIN)).resolve() is None


async def test_the_real_resolver_finds_localhost() -> None:
    assert "tcp://127.0.0.1:5555" in (await DnsDiscovery("localhost:5555").resolve() or set())


def test_names_need_a_port() -> None:
    assert parse_host_port("tandem-workers.ns.svc:5555") == ("tandem-workers.ns.svc", 5555)
    assert parse_host_port("[fd00::1]:5555") == ("fd00::1", 5555)
    for bad in ("tandem-workers", "tandem-workers:", ":5555", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


# -- the pool following discovery -------------------------------------------------------------------


class Scripted:
    """A discovery source whose answer the test sets: a set, None (cannot tell) or an exception."""

    def __init__(self) -> None:
        self.name = "scripted"
        self.answer: set[str] | None | Exception = set()
        self.asked = 0

    async def resolve(self) -> set[str] | None:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return None if self.answer is None else set(self.answer)

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def discovered(count: int) -> AsyncIterator[tuple[WorkerPool, Scripted, list[HandWorker]]]:
    context = zmq.asyncio.Context()
    workers = [HandWorker(context, ipc_address()) for _ in range(count)]
    source = Scripted()
    source.answer = {address(w) for w in workers}
    pool = WorkerPool([], context=context, heartbeat_interval=0.05, discovery=[source], discovery_interval=0.02)
    await pool.start()
    try:
        await until(lambda: len(pool.workers) == count and all(w.is_ready for w in pool.workers))
        yield pool, source, workers
    finally:
        for worker in workers:
            worker.close()
        await pool.close()


def address(worker: HandWorker) -> str:
    return str(worker.socket.getsockopt_string(zmq.LAST_ENDPOINT))


async def next_round(source: Scripted) -> None:
    """Until the pool has applied the source's current answer (two rounds: one may have started before)."""
    asked = source.asked
    await until(lambda: source.asked >= asked + 2)


async def test_a_worker_that_leaves_finishes_its_requests_takes_no_new_ones_then_goes() -> None:
    async with discovered(2) as (pool, source, (a, b)):
        stream = pool.generate(generate())
        first = asyncio.create_task(anext(stream))
        await until(lambda: a.generates or b.generates)
        leaving, staying = (a, b) if a.generates else (b, a)
        source.answer = {address(staying)}
        await next_round(source)
        assert [w.draining for w in pool.workers if w.address == address(leaving)] == [True]
        assert pool.is_ready
        for _ in range(3):  # new requests: all on the one that stays
            other = pool.generate(generate())
            task = asyncio.create_task(anext(other))
            await until(lambda: len(staying.generates) > 0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await other.aclose()
        assert len(leaving.generates) == 1
        request_id = leaving.generates[0].id
        await leaving.send(Delta(id=request_id, text="still here", num_output_tokens=1))
        assert (await first).text == "still here"  # type: ignore[union-attr]
        await leaving.send(Done(id=request_id, finish_reason="stop", usage=Usage(1, 2)))
        assert isinstance(await anext(stream), Done)
        with pytest.raises(StopAsyncIteration):  # the end of the stream: the request is off the worker
            await anext(stream)
        await until(lambda: len(pool.workers) == 1)
        assert pool.workers[0].address == address(staying)
        assert address(leaving) not in pool.metrics.worker_up._metrics  # its series went with it


async def test_a_dead_worker_that_leaves_fails_its_requests_cleanly() -> None:
    async with discovered(1) as (pool, source, (worker,)):
        stream = pool.generate(generate())
        first = asyncio.create_task(anext(stream))
        await worker.got_generate.wait()
        worker.close()  # the process is gone: the connection notices at once
        source.answer = set()
        with pytest.raises(Unavailable):
            await first
        await until(lambda: not pool.workers)
        assert not pool.is_ready


async def test_a_worker_back_before_it_drained_takes_requests_again() -> None:
    async with discovered(1) as (pool, source, (worker,)):
        stream = pool.generate(generate())
        first = asyncio.create_task(anext(stream))
        await worker.got_generate.wait()
        source.answer = set()
        await next_round(source)
        assert pool.workers[0].draining and not pool.is_ready
        source.answer = {address(worker)}
        await next_round(source)
        assert not pool.workers[0].draining and pool.is_ready
        request_id = worker.generates[0].id
        await worker.send(Done(id=request_id, finish_reason="stop", usage=Usage(1, 0)))
        assert isinstance(await first, Done)
        await next_round(source)
        assert len(pool.workers) == 1  # not dropped: it is wanted again
        await stream.aclose()


async def test_a_source_that_cannot_tell_keeps_its_workers() -> None:
    async with discovered(2) as (pool, source, _):
        source.answer = None
        await next_round(source)
        source.answer = RuntimeError("ray is down")
        await next_round(source)
        assert len(pool.workers) == 2 and not any(w.draining for w in pool.workers)
        assert len(pool.discovered()["scripted"]) == 2


async def test_static_workers_are_never_drained() -> None:
    context = zmq.asyncio.Context()
    static = HandWorker(context, ipc_address())
    source = Scripted()
    pool = WorkerPool([address(static)], context=context, heartbeat_interval=0.05, discovery=[source],
                      discovery_interval=0.02)  # fmt: skip
    await pool.start()
    try:
        await next_round(source)
        await until(lambda: pool.is_ready)
        assert [w.address for w in pool.workers] == [address(static)] and not pool.workers[0].draining
    finally:
        static.close()
        await pool.close()


# -- flags --------------------------------------------------------------------------------------


def test_gateway_flags_for_discovery_and_routing() -> None:
    config, _ = gateway_main.parse_args(["--worker-dns=tandem-workers:5555", "--routing=least_loaded"])
    assert config.worker_dns == ("tandem-workers:5555",) and config.workers == ()  # no default local worker
    assert config.routing.policy == "least_loaded"
    config, _ = gateway_main.parse_args(["--worker-ray=auto", "--route-balance-abs=4"])
    assert (config.worker_ray, config.ray_namespace, config.routing.balance_abs) == ("auto", "tandem", 4)
    for wrong in (["--worker-dns=tandem-workers"], ["--worker-dns=w:5555", "--registry=ipc:///x"]):
        with pytest.raises(SystemExit):
            gateway_main.parse_args(wrong)


def test_launcher_flags_for_ray() -> None:
    assert launcher_config.parse_args([]).ray is None
    assert launcher_config.parse_args(["--ray"]).ray == ""  # the local cluster, started if there is none
    config = launcher_config.parse_args(["--ray", "10.0.0.1:6379", "--workers", "4", "--ray-gateway-node", "10.0.0.2"])
    assert (config.ray, config.num_workers, config.ray_gateway_nodes) == ("10.0.0.1:6379", 4, ("10.0.0.2",))
    with pytest.raises(SystemExit):
        launcher_config.parse_args(["--ray-gateway-node", "10.0.0.2"])  # without --ray
