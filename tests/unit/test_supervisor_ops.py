"""The supervisor's registry and control socket with the real gateway, over real sockets, without a model: scripted
workers run in threads where the launcher starts processes. Loads on demand, a shared first load, an unload that
waits for the stream it would cut, eviction under --max-loaded-models."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest
import zmq
from test_ops_harness import ScriptedEngine, serve_gateway, wait_until

from common.protocol import ModelCard, WorkerInfo
from supervisor.control import ControlServer
from supervisor.processes import Child, WorkerProcess, cpu_slices
from supervisor.registry import Budget, GiB, ModelManager
from worker.catalog import Entry
from worker.server import WorkerServer


class NamedEngine(ScriptedEngine):
    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name

    def info(self) -> WorkerInfo:
        return msgspec.structs.replace(super().info(), models=[ModelCard(name=self.name, context_length=64)])


class ThreadChild:
    """A worker 'process': a scripted WorkerServer on a thread, with the Child methods WorkerProcess uses."""

    def __init__(self, name: str, address: str, starts: list[str], gate: threading.Event, **engine: Any) -> None:
        self.name, self.address, self.starts, self.gate, self.engine = name, address, starts, gate, engine
        self.crashes: list[float] = []
        self.server: WorkerServer | None = None
        self.thread: threading.Thread | None = None
        self.process: object | None = None
        self.pid = 0

    def start(self) -> None:
        self.starts.append(self.name)
        server = self.server = WorkerServer(NamedEngine(self.name, **self.engine), self.address)  # type: ignore[arg-type]
        self.thread = threading.Thread(target=lambda: self.gate.wait(10) and server.run(), daemon=True)
        self.thread.start()
        self.process = self.thread

    @property
    def exit_code(self) -> int | None:
        return None if self.thread is None or self.thread.is_alive() else 0

    def terminate(self) -> None:
        if self.server is not None:
            self.server.stop()

    kill = terminate


@contextlib.contextmanager
def supervised(
    max_loaded: int = 3, gate: threading.Event | None = None, **engine: Any
) -> Iterator[tuple[str, ModelManager, list[str]]]:
    """Models "a" and "b" behind a running control socket; yields its address, the registry and every start.
    A worker starts serving once `gate` is set (at once without one): its model loads until then."""
    if gate is None:
        gate = threading.Event()
        gate.set()
    folder = tempfile.mkdtemp(prefix="tandem-test-")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    starts: list[str] = []

    def spawn(entry: Entry) -> list[WorkerProcess]:
        address = f"ipc://{folder}/{entry.name}.sock"
        return [WorkerProcess(ThreadChild(entry.name, address, starts, gate, **engine), address, context)]  # type: ignore[arg-type]

    entries = [Entry(name, name, ModelCard(name, 64, capabilities=["completion"])) for name in ("a", "b")]
    manager = ModelManager(entries, Budget(max_loaded, 300.0, lambda: 100 * GiB, lambda e: GiB), spawn)
    control = ControlServer(manager, f"ipc://{folder}/control.sock", context)
    stopping = threading.Event()
    loop = threading.Thread(target=lambda: [control.turn(20) for _ in iter(stopping.is_set, True)], daemon=True)
    loop.start()
    try:
        yield control.address, manager, starts
    finally:
        stopping.set()
        loop.join(5)
        manager.shutdown()
        control.close()
        context.term()


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False, **fields}


def loaded(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(f"{url}/api/ps").json()["models"]]


def test_eight_first_requests_share_one_load_and_each_model_answers() -> None:
    loading = threading.Event()
    with supervised(gate=loading) as (address, manager, starts), serve_gateway(registry=address) as gateway:
        gateway.wait_ready()
        url = gateway.base_url
        assert [m["name"] for m in httpx.get(f"{url}/api/tags").json()["models"]] == ["a:latest", "b:latest"]
        assert loaded(url) == []
        with ThreadPoolExecutor(8) as pool:
            asked = [pool.submit(httpx.post, f"{url}/api/chat", json=chat("a"), timeout=30) for _ in range(8)]
            wait_until(lambda: sum(g.busy.get("a", 0) for g in list(manager.gateways.values())) == 8)
            loading.set()  # all eight wait for the model: now it loads
            answers = [future.result() for future in asked]
        assert [a.status_code for a in answers] == [200] * 8 and starts == ["a"]
        assert all(a.json()["load_duration"] > 0 for a in answers)  # each waited for the one load
        assert httpx.post(f"{url}/api/chat", json=chat("b:latest"), timeout=30).status_code == 200
        assert starts == ["a", "b"] and loaded(url) == ["a:latest", "b:latest"]


def test_an_unload_waits_for_the_stream_it_would_cut() -> None:
    with (
        supervised(num_tokens=10_000, step_s=0.005) as (address, manager, _),
        serve_gateway(registry=address) as gateway,
    ):
        gateway.wait_ready()
        url = gateway.base_url
        order: list[str] = []
        body = {**chat("a", stream=True), "options": {"num_predict": 200}}
        with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(lines)  # streaming: the model is loaded and busy
            unloading = ThreadPoolExecutor(1).submit(
                lambda: order.append(
                    httpx.post(f"{url}/api/generate", json={"model": "a", "keep_alive": 0}, timeout=30).json()[
                        "done_reason"
                    ]
                )
            )
            wait_until(lambda: manager.state(False).placements[0].state == "unloading")  # out of service at once
            rest = [line for line in lines if line]
            order.append("stream done")
        unloading.result(30)
        assert '"done":true' in rest[-1] and '"done_reason":"length"' in rest[-1]  # not cut: all 200 tokens
        assert order == ["stream done", "unload"] and loaded(url) == []


def test_max_loaded_models_one_evicts_the_idle_model() -> None:
    with supervised(max_loaded=1) as (address, _, starts), serve_gateway(registry=address) as gateway:
        gateway.wait_ready()
        for model in ("a", "b", "a"):
            assert httpx.post(f"{gateway.base_url}/api/chat", json=chat(model), timeout=30).status_code == 200
            assert loaded(gateway.base_url) == [f"{model}:latest"]
        assert starts == ["a", "b", "a"]


def test_cpu_slices_are_disjoint_and_even_or_round_robin_when_cpus_are_few() -> None:
    assert cpu_slices([0, 1], 2) == [frozenset({0}), frozenset({1})]
    assert cpu_slices([3, 1, 2, 0, 4], 2) == [frozenset({0, 1, 2}), frozenset({3, 4})]
    assert cpu_slices([0, 1], 3) == [frozenset({0}), frozenset({1}), frozenset({0})]
    assert cpu_slices([0, 1, 2, 3], 1) == [frozenset({0, 1, 2, 3})]


def test_a_child_with_cpus_runs_on_them_only() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to narrow")
    cpus = frozenset({min(os.sched_getaffinity(0))})
    # The launcher sets the affinity just after the child starts: the probe waits for it (exit 1), or exits with how
    # many CPUs it still has after 30 s.
    probe = (
        "import os, sys, time\n"
        "deadline = time.monotonic() + 30\n"
        "while len(os.sched_getaffinity(0)) != 1 and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "sys.exit(len(os.sched_getaffinity(0)))"
    )
    child = Child("probe", [sys.executable, "-c", probe], cpus=cpus)
    child.start()
    assert child.process is not None and child.process.wait(30) == 1
