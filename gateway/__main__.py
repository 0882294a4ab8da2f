"""`python -m gateway`: serve the HTTP APIs in front of one or more workers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from common import logs
from common.curve import CurveKeys
from gateway.app import create_app
from gateway.auth import read_key_file
from gateway.config import GatewayConfig
from gateway.discovery import parse_host_port
from gateway.routing import POLICIES, RoutingConfig

logger = logging.getLogger("gateway")


def parse_args(argv: list[str] | None = None) -> tuple[GatewayConfig, argparse.Namespace]:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--worker", action="append", dest="workers", help="ZeroMQ address of a worker (repeatable)")
    parser.add_argument(
        "--registry", default=env("TANDEM_REGISTRY") or None, help="the supervisor's control socket (launcher.py)"
    )
    cluster = parser.add_argument_group("workers that come and go (README: Cluster)")
    cluster.add_argument(
        "--worker-dns",
        action="append",
        default=[t for t in env("TANDEM_WORKER_DNS", "").split(",") if t],
        metavar="NAME:PORT",
        help="a name that resolves to every worker (a Kubernetes headless Service), resolved again every "
        "--discovery-interval; one worker per address (repeatable)",
    )
    cluster.add_argument(
        "--worker-ray",
        default=env("TANDEM_WORKER_RAY") or None,
        metavar="ADDRESS",
        help="find the workers `launcher.py --ray` placed on this Ray cluster (auto: the local one)",
    )
    cluster.add_argument("--ray-namespace", default=env("TANDEM_RAY_NAMESPACE", "tandem"))
    cluster.add_argument("--discovery-interval", type=float, default=5.0, help="seconds between discovery rounds")
    routing = parser.add_argument_group("routing among the workers of a model")
    routing.add_argument(
        "--routing",
        choices=POLICIES,
        default=env("TANDEM_ROUTING", RoutingConfig.policy),
        help="cache_aware: a prompt goes where its prefix is cached unless loads are uneven; least_loaded",
    )
    routing.add_argument("--route-cache-threshold", type=float, default=RoutingConfig.cache_threshold)
    routing.add_argument("--route-balance-abs", type=int, default=RoutingConfig.balance_abs)
    routing.add_argument("--route-balance-rel", type=float, default=RoutingConfig.balance_rel)
    routing.add_argument(
        "--route-tree-chars",
        type=int,
        default=RoutingConfig.max_chars,
        help="characters of prompts remembered per worker for cache-aware routing",
    )
    parser.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("TANDEM_PORT", "8000")))
    parser.add_argument("--fd", type=int, default=None, help="serve on this inherited listening socket (launcher)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-body-bytes", type=int, default=GatewayConfig.max_body_bytes)
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=float(env("TANDEM_REQUEST_TIMEOUT", str(GatewayConfig.request_timeout))),
        help="seconds before a request is aborted in the worker and answered 504 (0: no limit)",
    )
    limits.add_argument(
        "--default-max-tokens",
        type=int,
        default=int(env("TANDEM_DEFAULT_MAX_TOKENS", str(GatewayConfig.default_max_tokens))),
        help="output tokens for a request that sets no limit when the model has no default either (0: up to the "
        "context)",
    )
    limits.add_argument(
        "--buffer-bytes",
        type=int,
        default=GatewayConfig.buffer_bytes,
        help="bytes of answer held for one client that reads slowly before its request is given up",
    )
    limits.add_argument(
        "--max-in-flight", type=int, default=None, help="generations at once in this process before 429/503"
    )
    limits.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM"
    )
    parser.add_argument(
        "--strict-tools",
        action="store_true",
        help="a request with tools for a model whose chat template cannot render them is a 400 (default: the "
        "tools are ignored, with a warning header and log line, so chat UIs that always send tools work)",
    )
    parser.add_argument(
        "--reasoning-field",
        action="store_true",
        help="also send thinking as `reasoning` beside `reasoning_content` (OpenAI routes)",
    )
    seeds = parser.add_argument_group("seed services' APIs")
    seeds.add_argument(
        "--seed-max-tokens",
        type=int,
        default=None,
        help="most output tokens on the seed services' routes, whatever the request asks (default: their own limits)",
    )
    seeds.add_argument(
        "--root-json",
        action="store_true",
        help="GET / answers the JSON service description (seed 003) unless the client asks for text/plain",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    security.add_argument(
        "--api-key-file", action="append", default=[], type=Path, help="file of API keys, one per line (repeatable)"
    )
    security.add_argument("--protect-health", action="store_true", help="/health* needs an API key too")
    security.add_argument("--protect-metrics", action="store_true", help="/metrics and /stats need an API key too")
    security.add_argument(
        "--cors-origins", default=env("TANDEM_CORS_ORIGINS", ""), help="comma-separated origins allowed by CORS, or *"
    )
    security.add_argument("--curve-server-key", type=Path, help="the workers' CURVE public key file (server.key)")
    security.add_argument("--curve-client-key", type=Path, help="this gateway's CURVE key (client.key_secret)")
    parser.add_argument("--log-level", default=env("TANDEM_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=logs.FORMATS, default=env("TANDEM_LOG_FORMAT", "text"))
    args = parser.parse_args(argv)

    keys = list(args.api_key)
    if env("TANDEM_API_KEY_FILE"):
        args.api_key_file.append(Path(env("TANDEM_API_KEY_FILE", "")))
    try:
        for path in args.api_key_file:
            keys += read_key_file(path)
        if (args.curve_server_key is None) != (args.curve_client_key is None):
            raise ValueError("--curve-server-key and --curve-client-key go together")
        if args.curve_server_key and args.curve_client_key:
            CurveKeys.load(args.curve_server_key, args.curve_client_key)  # fail now, not in the lifespan
        for target in args.worker_dns:
            parse_host_port(target)
        discovered = bool(args.worker_dns or args.worker_ray)
        if discovered and args.registry:
            raise ValueError("--registry manages the workers itself: not with --worker-dns or --worker-ray")
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    local = [env("TANDEM_WORKER_BIND", "ipc:///tmp/tandem-worker-0.sock")]
    default_worker = [] if args.registry or discovered else local
    workers = tuple(args.workers or default_worker)
    metrics_dir = env("PROMETHEUS_MULTIPROC_DIR")  # prometheus-client itself reads it too, at import
    config = GatewayConfig(
        workers=workers,
        registry=args.registry,
        worker_dns=tuple(args.worker_dns),
        worker_ray=args.worker_ray,
        ray_namespace=args.ray_namespace,
        discovery_interval=args.discovery_interval,
        routing=RoutingConfig(
            policy=args.routing,
            cache_threshold=args.route_cache_threshold,
            balance_abs=args.route_balance_abs,
            balance_rel=args.route_balance_rel,
            max_chars=args.route_tree_chars,
        ),
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout or None,
        buffer_bytes=args.buffer_bytes,
        default_max_tokens=args.default_max_tokens or None,
        strict_tools=args.strict_tools,
        max_in_flight=args.max_in_flight,
        reasoning_field=args.reasoning_field,
        shutdown_grace=args.shutdown_grace,
        api_keys=tuple(keys),
        protect_health=args.protect_health,
        protect_metrics=args.protect_metrics,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        curve_server_key=args.curve_server_key,
        curve_client_key=args.curve_client_key,
        metrics_dir=Path(metrics_dir) if metrics_dir else None,
        seed_max_tokens=args.seed_max_tokens,
        root_json=args.root_json,
    )
    return config, args


class Server(uvicorn.Server):
    """uvicorn with two changes for SIGTERM: the app starts draining (new requests 503, see app.DrainGate) the
    moment the signal lands, and a clean drain exits 0 (uvicorn re-raises the signal, dying by it)."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.http_app = app

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # tests run it in a thread
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.http_app.state.draining:
            grace = self.config.timeout_graceful_shutdown
            logger.info("%s: draining; in-flight requests get %ss", signal.Signals(sig).name, grace)
        self.http_app.state.draining = True
        super().handle_exit(sig, frame)


def serve(config: GatewayConfig, fd: int | None = None, log_level: str = "info") -> None:
    app = create_app(config)
    uvicorn_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_config=None,  # our handlers (common.logs), text or JSON
        log_level=log_level,
        access_log=False,  # gateway.observe logs one richer line per request
        timeout_graceful_shutdown=round(config.shutdown_grace),
    )
    sockets = [socket.socket(fileno=fd)] if fd is not None else None
    Server(uvicorn_config, app).run(sockets=sockets)


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    serve(config, args.fd, args.log_level)


if __name__ == "__main__":
    main()
