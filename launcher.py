"""`python launcher.py`: start the worker(s), wait until they are ready, start the gateway, keep them alive.

A worker that dies is restarted with back-off (the gateway fails its in-flight requests at once and
reports not-ready until the new worker answers); after repeated crashes the launcher gives up loudly.
Ctrl-C or SIGTERM stops the gateway first (in-flight streams get a grace period), then the workers; exit 0.

`--gateways N` runs N gateway processes on one listening socket that the launcher opens and hands down;
their metrics meet in one prometheus-client multiprocess folder, so any of them answers /metrics for all.
`python launcher.py keygen DIR` writes the CURVE keys for workers on other hosts (see README, Operations).
`python launcher.py batch IN.jsonl OUT.jsonl` runs an OpenAI Batch file; `python launcher.py chat` chats in the
terminal (see cli/).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import zmq
from prometheus_client import multiprocess

from common import logs
from common.curve import keygen
from common.protocol import Info, WorkerInfo, encode, to_gateway_decoder

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
    num_gateways: int = 1
    log_format: str = "text"


@dataclass(eq=False)
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes
    pass_fds: tuple[int, ...] = ()
    env: dict[str, str] | None = None

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches only the launcher, which stops children in order.
        self.process = subprocess.Popen(
            self.command, cwd=HERE, start_new_session=True, pass_fds=self.pass_fds, env=self.env
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
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
        run_dir = Path(tempfile.mkdtemp(prefix="tandem-"))  # 0700: only this user reaches the sockets
        self.addresses = [f"ipc://{run_dir}/worker-{i}.sock" for i in range(config.num_workers)]
        self.workers = [Child(f"worker {i}", self._worker_command(a)) for i, a in enumerate(self.addresses)]
        self.listener: socket.socket | None = None
        self.metrics_dir: Path | None = None
        env = dict(os.environ)
        if config.num_gateways > 1:  # several processes: one metrics folder they all write and read
            self.metrics_dir = run_dir / "metrics"
            self.metrics_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        names = ["gateway"] if config.num_gateways == 1 else [f"gateway {i}" for i in range(config.num_gateways)]
        self.gateways = [Child(name, [], env=env) for name in names]

    def _gateway_command(self, fd: int) -> list[str]:
        command = [sys.executable, "-m", "gateway", "--host", self.config.host, "--port", str(self.config.port)]
        for address in self.addresses:
            command += ["--worker", address]
        command += ["--fd", str(fd), "--shutdown-grace", str(self.config.grace_period)]
        return command + ["--log-format", self.config.log_format, *self.config.gateway_args]

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
        return command + ["--log-format", self.config.log_format, *self.config.worker_args]

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for worker, address in zip(self.workers, self.addresses, strict=True):
                worker.start()
                if not self._wait_ready(worker, address):
                    return 0 if self.stopping else 1
            try:
                self._start_gateways()
            except OSError as exc:
                logger.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc.strerror)
                return 1
            if not self._wait_http():
                return 0 if self.stopping else 1
            logger.info("tandem is serving on http://%s:%d", self.config.host, self.config.port)
            return self._supervise()
        finally:
            self._shutdown()

    def _start_gateways(self) -> None:
        """The launcher opens the port and hands it down: several gateways share it, and a restarted gateway
        finds the connections that queued meanwhile."""
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, self.config.port), family=family, backlog=2048)
        self.listener.set_inheritable(True)
        fd = self.listener.fileno()
        for gateway in self.gateways:
            gateway.command, gateway.pass_fds = self._gateway_command(fd), (fd,)
            gateway.start()

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
        """Until every gateway process has answered ready: they share the port, so until then a request could
        land on one that has not reached the workers yet and be refused."""
        url = (
            f"http://{self.config.host if self.config.host not in ('0.0.0.0', '::') else '127.0.0.1'}"
            f":{self.config.port}/health"
        )
        pending = {gateway.pid for gateway in self.gateways}
        while not self.stopping:
            for gateway in self.gateways:
                if gateway.exit_code is not None:
                    logger.error("%s exited with code %s while starting", gateway.name, gateway.exit_code)
                    return False
            try:
                response = httpx.get(url, timeout=1)  # a new connection each time: any process may take it
                if response.status_code == 401:  # serving, with --protect-health: readiness is not ours to see
                    return True
                if response.status_code == 200:
                    pending.discard(response.json().get("gateway_pid"))
                    if not pending:
                        return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05 if pending else 0.2)
        return False

    def _supervise(self) -> int:
        while not self.stopping:
            time.sleep(0.2)
            for child in [*self.workers, *self.gateways]:
                code = child.exit_code
                if code is None or self.stopping:
                    continue
                if child in self.gateways and self.metrics_dir and child.pid:
                    multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))  # its live gauges go
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
        if self.listener is not None:
            self.listener.close()  # the gateways hold their own copies; once they close theirs, none is left
        for gateway in self.gateways:
            gateway.terminate()  # all at once: each drains its in-flight streams (uvicorn) in parallel
        for gateway in self.gateways:
            gateway.stop(timeout=self.config.grace_period + 5)
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
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to each worker")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra flag passed to the gateway")
    parser.add_argument("--log-format", choices=logs.FORMATS, default=env("TANDEM_LOG_FORMAT", "text"))
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
        num_gateways=args.gateways,
        log_format=args.log_format,
    )


# -- CURVE keys ---------------------------------------------------------------------------------


def keygen_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python launcher.py keygen", description=keygen.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--force", action="store_true", help="replace keys that are already there")
    args = parser.parse_args(argv)
    if not keygen(args.directory, force=args.force):
        logger.info("CURVE keys already in %s; kept them (--force replaces them)", args.directory)
        return 0
    d = args.directory
    logger.info("CURVE keys written to %s", d)
    logger.info("worker:  --curve-secret-key %s --curve-authorized-dir %s", d / "server.key_secret", d / "authorized")
    logger.info("gateway: --curve-server-key %s --curve-client-key %s", d / "server.key", d / "client.key_secret")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        logs.configure()
        return keygen_main(argv[1:])
    if argv[:1] == ["batch"]:
        from cli import batch  # the client commands' imports (tqdm, readline) are not the server's

        logs.configure()
        return batch.main(argv[1:])
    if argv[:1] == ["chat"]:
        from cli import chat

        return chat.main(argv[1:])
    config = parse_args(argv)
    logs.configure("info", config.log_format)
    return Launcher(config).run()


if __name__ == "__main__":
    sys.exit(main())
