"""The gateway's one frozen config, built in `gateway.__main__` (or the launcher) from flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GatewayConfig:
    workers: tuple[str, ...]  # ZeroMQ addresses of the workers, e.g. ipc:///tmp/tandem-0.sock
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float | None = None  # seconds; past it the request is aborted in the worker
    reasoning_field: bool = False  # OpenAI: also emit thinking as `reasoning` beside `reasoning_content`
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    version: str = "0.1.0"
