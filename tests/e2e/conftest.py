"""End-to-end fixtures: the real launcher, the real default model, on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300  # the very first start converts the GGUF file; later starts use the cache


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.base_url}/health", timeout=5)

    def wait_ready(self, timeout: float = START_TIMEOUT, gateways: int = 1) -> dict:
        """Until /health says ready from `gateways` distinct gateway processes (they share the port)."""
        deadline = time.monotonic() + timeout
        ready: set[int] = set()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = self.health()
                if response.status_code == 200:
                    ready.add(response.json()["gateway_pid"])
                    if len(ready) >= gateways:
                        return response.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.05 if ready else 0.25)
        raise TimeoutError(f"tandem not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(log_dir: Path, *extra: str) -> Server:
    port = free_port()
    log_path = log_dir / f"launcher-{port}.log"
    command = [sys.executable, "launcher.py", "--port", str(port), "--grace-period", "10", *extra]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(process, port, log_path)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One tandem shared by the tests that leave it as they found it."""
    server = start_server(tmp_path_factory.mktemp("tandem"), "--worker-arg=--max-running=16")
    yield server
    assert server.stop() == 0, server.log()
