"""The gateway's one frozen config, built in `gateway.__main__` (or the launcher) from flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.routing import RoutingConfig


@dataclass(frozen=True)
class GatewayConfig:
    workers: tuple[str, ...]  # ZeroMQ addresses of fixed workers, e.g. ipc:///tmp/tandem-0.sock
    registry: str | None = None  # the supervisor's control socket: workers come and go as models load and unload
    worker_dns: tuple[str, ...] = ()  # NAME:PORT, resolved every `discovery_interval` to all its workers
    worker_ray: str | None = None  # a Ray cluster's address: the workers the launcher placed there as actors
    ray_namespace: str = "tandem"
    discovery_interval: float = 5.0  # seconds between two rounds of discovery
    routing: RoutingConfig = RoutingConfig()
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    request_timeout: float | None = 900.0  # seconds; past it the request is aborted in the worker (None: never)
    buffer_bytes: int = 4 * 2**20  # answer held for one slow reader before its request is given up
    max_in_flight: int | None = None  # generations at once in this gateway process, over all workers
    reasoning_field: bool = False  # OpenAI: also emit thinking as `reasoning` beside `reasoning_content`
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    protect_health: bool = False  # /health* needs an API key too
    protect_metrics: bool = False  # /metrics and /stats need an API key too
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    curve_server_key: Path | None = None  # the workers' CURVE public key (server.key)
    curve_client_key: Path | None = None  # this gateway's CURVE keypair (client.key_secret)
    metrics_dir: Path | None = None  # prometheus-client multiprocess directory, when several processes serve
    version: str = "0.1.0"
    default_max_tokens: int | None = 2048  # output cap where neither the request nor the model sets one (None: off)
    strict_tools: bool = False  # tools for a model whose template cannot render them: 400 instead of ignored
    seed_max_tokens: int | None = None  # cap on output tokens on the seed services' routes (None: their own limits)
    root_json: bool = False  # GET / answers seed 003's JSON description to every client not asking for text
