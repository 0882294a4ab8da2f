"""`python -m gateway`: serve the HTTP APIs in front of one or more workers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--worker", action="append", dest="workers", help="ZeroMQ address of a worker (repeatable)")
    parser.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("TANDEM_PORT", "8000")))
    parser.add_argument("--max-body-bytes", type=int, default=GatewayConfig.max_body_bytes)
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is aborted")
    parser.add_argument(
        "--reasoning-field",
        action="store_true",
        help="also send thinking as `reasoning` beside `reasoning_content` (OpenAI routes)",
    )
    parser.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM"
    )
    args = parser.parse_args(argv)
    workers = tuple(args.workers or [env("TANDEM_WORKER_BIND", "ipc:///tmp/tandem-worker-0.sock")])
    return GatewayConfig(
        workers=workers,
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
        reasoning_field=args.reasoning_field,
        shutdown_grace=args.shutdown_grace,
    )


class Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die by the signal;
    a clean drain should exit 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn_config = uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=int(config.shutdown_grace),
    )
    Server(uvicorn_config).run()


if __name__ == "__main__":
    main()
