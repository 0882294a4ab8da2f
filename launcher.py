"""`python launcher.py`: start the worker(s), wait until they are ready, start the gateway, keep them alive.

A worker that dies is restarted with back-off (the gateway fails its in-flight requests at once and
reports not-ready until the new worker answers); after repeated crashes the launcher gives up loudly.
Ctrl-C or SIGTERM stops the gateway first (in-flight streams get a grace period), then the workers; exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zmq

from worker.protocol import Info, WorkerInfo, encode, to_gateway_decoder

logger = logging.getLogger("launcher")

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class LaunchConfig:
    host: str
    port: int
    model: str | None
    device: str
    dtype: str
    num_workers: int
    worker_args: tuple[str, ...]
    gateway_args: tuple[str, ...]
    grace_period: float
    max_restarts: int  # crashes within `restart_window` seconds before giving up
    restart_window: float = 300.0


@dataclass(eq=False)
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches only the launcher, which stops children in order.
        self.process = subprocess.Popen(self.command, cwd=HERE, start_new_session=True)

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def stop(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs: killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


class Launcher:
    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.stopping = False
        run_dir = Path(tempfile.mkdtemp(prefix="tandem-"))
        self.addresses = [f"ipc://{run_dir}/worker-{i}.sock" for i in range(config.num_workers)]
        self.workers = [Child(f"worker {i}", self._worker_command(a)) for i, a in enumerate(self.addresses)]
        gateway = [sys.executable, "-m", "gateway", "--host", config.host, "--port", str(config.port)]
        for address in self.addresses:
            gateway += ["--worker", address]
        gateway += ["--shutdown-grace", str(config.grace_period)]
        self.gateway = Child("gateway", gateway + list(config.gateway_args))

    def _worker_command(self, address: str) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "worker",
            "--bind",
            address,
            "--device",
            self.config.device,
            "--dtype",
            self.config.dtype,
        ]
        if self.config.model:
            command += ["--model", self.config.model]
        return command + list(self.config.worker_args)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for worker, address in zip(self.workers, self.addresses, strict=True):
                worker.start()
                if not self._wait_ready(worker, address):
                    return 0 if self.stopping else 1
            self.gateway.start()
            if not self._wait_http():
                return 0 if self.stopping else 1
            logger.info("tandem is serving on http://%s:%d", self.config.host, self.config.port)
            return self._supervise()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            logger.info("%s: shutting down", signal.Signals(signum).name)
        self.stopping = True

    def _wait_ready(self, worker: Child, address: str) -> bool:
        """Ping the worker until it describes itself; a progress line while the model loads."""
        context = zmq.Context.instance()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.connect(address)
        started = last_note = time.monotonic()
        try:
            while not self.stopping:
                if worker.exit_code is not None:
                    logger.error("%s exited with code %s while starting", worker.name, worker.exit_code)
                    return False
                if socket.poll(0, zmq.POLLOUT):  # connected: ask again (the socket holds nothing while not)
                    socket.send(encode(Info()), zmq.NOBLOCK)
                if socket.poll(500, zmq.POLLIN):
                    info = to_gateway_decoder.decode(socket.recv())
                    if isinstance(info, WorkerInfo):
                        names = ", ".join(m.name for m in info.models)
                        logger.info(
                            "%s ready: %s on %s (%.1fs)", worker.name, names, info.device, time.monotonic() - started
                        )
                        return True
                if time.monotonic() - last_note >= 5:
                    last_note = time.monotonic()
                    logger.info("%s: loading the model… %.0fs", worker.name, last_note - started)
            return False
        finally:
            socket.close(linger=0)

    def _wait_http(self) -> bool:
        url = (
            f"http://{self.config.host if self.config.host not in ('0.0.0.0', '::') else '127.0.0.1'}"
            f":{self.config.port}/health"
        )
        while not self.stopping:
            if self.gateway.exit_code is not None:
                logger.error("gateway exited with code %s while starting", self.gateway.exit_code)
                return False
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def _supervise(self) -> int:
        while not self.stopping:
            time.sleep(0.2)
            for child in [*self.workers, self.gateway]:
                code = child.exit_code
                if code is None or self.stopping:
                    continue
                if not self._restart(child, code):
                    return 1
        return 0

    def _restart(self, child: Child, code: int) -> bool:
        now = time.monotonic()
        child.crashes = [t for t in child.crashes if now - t < self.config.restart_window] + [now]
        if len(child.crashes) > self.config.max_restarts:
            logger.error(
                "%s crashed %d times in %.0fs (last exit code %s): giving up",
                child.name,
                len(child.crashes),
                self.config.restart_window,
                code,
            )
            return False
        delay = min(0.5 * 2 ** (len(child.crashes) - 1), 30.0)
        logger.warning("%s exited with code %s; restarting in %.1fs", child.name, code, delay)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.1)
        if not self.stopping:
            child.start()
        return True

    def _shutdown(self) -> None:
        self.gateway.stop(timeout=self.config.grace_period + 5)  # uvicorn drains in-flight streams itself
        for worker in self.workers:
            worker.stop(timeout=10)


def parse_args(argv: list[str] | None = None) -> LaunchConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python launcher.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("TANDEM_PORT", "8000")))
    parser.add_argument(
        "--model",
        default=env("TANDEM_MODEL") or None,
        help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--device", default=env("TANDEM_DEVICE", "auto"))
    parser.add_argument("--dtype", default=env("TANDEM_DTYPE", "auto"))
    parser.add_argument("--workers", type=int, default=1, help="worker processes (e.g. one per GPU)")
    parser.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight streams get on shutdown")
    parser.add_argument("--max-restarts", type=int, default=5, help="worker crashes within 5 minutes before giving up")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to each worker")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra flag passed to the gateway")
    args = parser.parse_args(argv)
    return LaunchConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        num_workers=args.workers,
        worker_args=tuple(args.worker_arg),
        gateway_args=tuple(args.gateway_arg),
        grace_period=args.grace_period,
        max_restarts=args.max_restarts,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
    return Launcher(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
