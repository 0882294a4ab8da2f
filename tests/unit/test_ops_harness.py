"""Model-free stand-ins for the operations tests: a scripted engine behind the real WorkerServer, and the real
gateway app on uvicorn in a thread. Real ZeroMQ and HTTP sockets; no model, no torch. (No tests in here.)"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from common.curve import ServerCurve
from common.protocol import Delta, Done, Failed, Generate, ModelCard, Timings, Usage, WorkerInfo
from gateway.__main__ import Server
from gateway.app import create_app
from gateway.config import GatewayConfig
from worker.server import WorkerServer

MODEL = "scripted"
Key = tuple[bytes, int]  # (peer, request id)


class ScriptedEngine:
    """The Engine methods WorkerServer calls. Each request streams one word per step (`step_s` apart) until
    its max_tokens (else `num_tokens`); `max_running` decode at once, up to `max_waiting` more queue."""

    def __init__(self, num_tokens: int = 5, step_s: float = 0.01, max_running: int = 8, max_waiting: int = 8):
        self.num_tokens, self.step_s = num_tokens, step_s
        self.max_running, self.max_waiting = max_running, max_waiting
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self.waiting: deque[tuple[Key, Generate, float]] = deque()
        self.running: dict[Key, tuple[Generate, int, float]] = {}  # request, tokens so far, time queued
        self.received: list[Generate] = []
        self.aborted: list[int] = []

    def add(self, peer: bytes, request: Generate, ready: Any = None) -> list[tuple[bytes, Any]]:
        """Takes the request in at once (no intake thread: `ready` is never called, admit() never needed)."""
        self.received.append(request)
        if request.prompt == "fail":
            return [(peer, Failed(id=request.id, code="bad_request", message="scripted failure"))]
        if len(self.running) + len(self.waiting) >= self.max_running + self.max_waiting:
            return [(peer, Failed(id=request.id, code="busy", message="queue full"))]
        self.waiting.append(((peer, request.id), request, time.monotonic()))
        return []

    def abort(self, peer: bytes, request_id: int) -> list[tuple[bytes, Any]]:
        self.aborted.append(request_id)
        found = self.running.pop((peer, request_id), None)
        self.waiting = deque(item for item in self.waiting if item[0] != (peer, request_id))
        return [(peer, Done(id=request_id, finish_reason="abort", usage=Usage(3, found[1] if found else 0)))]

    def abort_peer(self, peer: bytes, reason: str) -> list[tuple[bytes, Any]]:
        keys = [key for key in (*self.running, *(item[0] for item in self.waiting)) if key[0] == peer]
        for key in keys:
            self.aborted.append(key[1])
            self.running.pop(key, None)
        self.waiting = deque(item for item in self.waiting if item[0][0] != peer)
        return [(peer, Failed(id=key[1], code="unavailable", message=reason)) for key in keys]

    def fail_everything(self, message: str) -> list[tuple[bytes, Any]]:
        keys = [*self.running, *(item[0] for item in self.waiting)]
        self.running.clear()
        self.waiting.clear()
        return [(peer, Failed(id=request_id, code="internal", message=message)) for peer, request_id in keys]

    def close(self) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self) -> list[tuple[bytes, Any]]:
        time.sleep(self.step_s)
        while self.waiting and len(self.running) < self.max_running:
            key, request, queued = self.waiting.popleft()
            self.running[key] = (request, 0, time.monotonic() - queued)
        out: list[tuple[bytes, Any]] = []
        for (peer, request_id), (request, count, queued) in list(self.running.items()):
            count += 1
            self.running[(peer, request_id)] = (request, count, queued)
            out.append((peer, Delta(id=request_id, text=f"w{count} ", num_prompt_tokens=3, num_output_tokens=count)))
            cap = request.params.max_tokens  # the gateway always sets one now (its default output cap, at least)
            limit = min(cap or self.num_tokens, self.num_tokens)
            if count >= limit:
                del self.running[(peer, request_id)]
                reason = "length" if cap is not None and cap <= self.num_tokens else "stop"
                timings = Timings(queue=queued, prefill=0.001, decode=count * self.step_s)
                out.append((peer, Done(id=request_id, finish_reason=reason, usage=Usage(3, count), timings=timings)))
        return out

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            instance=self.instance,
            pid=0,
            models=[ModelCard(name=MODEL, context_length=1_000_000)],
            device="cpu",
            started_at=self.started_at,
            max_running=self.max_running,
            max_waiting=self.max_waiting,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_total=10,
            kv_blocks_used=len(self.running),
        )


@contextlib.contextmanager
def serve_worker(engine: ScriptedEngine, address: str, curve: ServerCurve | None = None) -> Iterator[WorkerServer]:
    server = WorkerServer(engine, address, curve)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, name="scripted-worker", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Gateway:
    server: Server
    app: Starlette
    base_url: str
    thread: threading.Thread

    @property
    def headers(self) -> dict[str, str]:
        """With API keys configured: the first, so probes pass --protect-health and --protect-metrics."""
        keys = self.app.state.config.api_keys
        return {"authorization": f"Bearer {keys[0]}"} if keys else {}

    def wait_ready(self, timeout: float = 10) -> None:
        wait_until(lambda: httpx.get(f"{self.base_url}/health", headers=self.headers).status_code == 200, timeout)

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", headers=self.headers).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@contextlib.contextmanager
def serve_gateway(*workers: str, **config: Any) -> Iterator[Gateway]:
    """The real app on a real port; `server.handle_exit(...)` plays SIGTERM (signals need the main thread)."""
    port = free_port()
    gateway_config = GatewayConfig(workers=workers, host="127.0.0.1", port=port, **config)
    app = create_app(gateway_config)
    uvicorn_config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=round(gateway_config.shutdown_grace),
    )
    server = Server(uvicorn_config, app)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        yield Gateway(server, app, f"http://127.0.0.1:{port}", thread)
    finally:
        server.should_exit = True
        thread.join(15)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def ipc_address() -> str:
    """A fresh ipc:// address in a 0700 folder of its own (pytest's tmp_path can pass the 107-byte limit)."""
    return f"ipc://{tempfile.mkdtemp(prefix='tandem-test-')}/worker.sock"


@contextlib.contextmanager
def tandem(engine: ScriptedEngine | None = None, **config: Any) -> Iterator[tuple[Gateway, ScriptedEngine]]:
    """A scripted worker and a gateway in front of it, ready."""
    engine = engine or ScriptedEngine()
    address = ipc_address()
    with serve_worker(engine, address), serve_gateway(address, **config) as gateway:
        gateway.wait_ready()
        yield gateway, engine


def chat(stream: bool = False, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **fields}
