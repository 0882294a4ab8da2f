"""`python launcher.py`: the supervisor. It lists every available model (supervisor/registry.py), loads the first
one, starts the gateway(s), then loads and unloads models as the gateways ask — one worker process per loaded model
(per replica), each on its own ipc:// address — and keeps them alive.

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
import functools
import hashlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx
import zmq
from prometheus_client import multiprocess

from common import logs
from common.curve import keygen
from supervisor import memory
from supervisor.adapters import adapter_entry
from supervisor.config import LaunchConfig, flag_value, param_flags, parse_args
from supervisor.control import ControlServer
from supervisor.processes import Child, WorkerProcess, cpu_slices
from supervisor.registry import Budget, ModelManager
from worker.catalog import CatalogError, Entry, discover

logger = logging.getLogger("launcher")

HERE = Path(__file__).resolve().parent
__all__ = ["Child", "LaunchConfig", "Launcher", "main", "parse_args"]


class Launcher:
    def __init__(self, config: LaunchConfig, entries: list[Entry] | None = None) -> None:
        self.config = config
        self.stopping = False
        self.run_dir = Path(tempfile.mkdtemp(prefix="tandem-"))  # 0700: only this user reaches the sockets
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        if entries is None:
            entries = discover(
                config.models, config.models_dir, config.hf_cache, builtin_embedding=config.builtin_embedding
            )
        self.entries = entries
        self._check_params()
        self.on_gpu = config.device.startswith("cuda") or (config.device == "auto" and memory.gpu_count() > 0)
        budget = Budget(
            max_loaded=config.max_loaded_models,
            keep_alive=config.keep_alive,
            free_memory=memory.free_gpu_memory if self.on_gpu else memory.free_ram,
            estimate=self._estimate,
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
        )
        self.manager = ModelManager(entries, budget, self._spawn, adapters=self._adapters(config.loras, entries))
        self.control = ControlServer(self.manager, f"ipc://{self.run_dir}/control.sock", self.context)
        self.listener: socket.socket | None = None
        self.metrics_dir: Path | None = None
        env = dict(os.environ)
        if config.num_gateways > 1:  # several processes: one metrics folder they all write and read
            self.metrics_dir = self.run_dir / "metrics"
            self.metrics_dir.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        names = ["gateway"] if config.num_gateways == 1 else [f"gateway {i}" for i in range(config.num_gateways)]
        self.gateways = [Child(name, [], env=env) for name in names]

    # -- workers ----------------------------------------------------------------------------

    @staticmethod
    def _adapters(specs: tuple[str, ...], entries: list[Entry]) -> list[Entry]:
        """`--lora NAME=PATH`, each listed as a model on its base; one that cannot be served is logged, not listed."""
        adapters: list[Entry] = []
        for spec in specs:
            name, sep, path = spec.partition("=")
            taken = {e.name.lower() for e in [*entries, *adapters]}
            try:
                if not sep or not name.strip() or not path:
                    raise CatalogError("expected NAME=PATH")
                if name.strip().lower() in taken:
                    raise CatalogError(f"the name {name.strip()} is taken")
                adapters.append(adapter_entry(name.strip(), path, entries))
            except CatalogError as exc:
                logger.warning("not serving LoRA adapter %s: %s", spec, exc)
        return adapters

    def _check_params(self) -> None:
        chat = {e.name.lower() for e in self.entries if not e.is_embedding}
        for param in self.config.params:
            if param.model is not None and param.model.lower() not in chat:
                logger.warning("--param %s:%s: no chat model of that name is listed", param.model, param.setting)

    def _spawn(self, entry: Entry) -> list[WorkerProcess]:
        """The worker processes of one model, one per replica, each on an ipc:// address of its own (the same
        for every load of that model, so the metrics' `worker` label stays bounded)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.name)[:40]
        slug += "-" + hashlib.sha256(entry.name.encode()).hexdigest()[:6]
        workers = []
        for i, cpus in enumerate(self._cpu_slices()):
            address = f"ipc://{self.run_dir}/{slug}-{i}.sock"
            name = f"worker {entry.name}" + (f" #{i}" if self.config.num_workers > 1 else "")
            command_for = functools.partial(self._worker_command, address, entry)
            env = None if cpus is None else {**os.environ, "OMP_NUM_THREADS": str(len(cpus))}
            child = Child(name, [], env=env, cpus=cpus)
            workers.append(WorkerProcess(child, address, self.context, command_for=command_for))
        return workers

    def _cpu_slices(self) -> list[frozenset[int] | None]:
        """Each replica's CPUs: a slice of its own when several workers of a model share this host's CPUs, unless
        the user chose the threads (OMP_NUM_THREADS set) or the workers run on GPUs."""
        replicas = self.config.num_workers
        if replicas == 1 or self.on_gpu or "OMP_NUM_THREADS" in os.environ:
            return [None] * replicas
        return list(cpu_slices(sorted(os.sched_getaffinity(0)), replicas))

    def _worker_command(self, address: str, entry: Entry) -> list[str]:
        command = [sys.executable, "-m", "worker", "--bind", address, "--device", self.config.device]
        command += ["--dtype", self.config.dtype, "--model", entry.spec, "--served-name", entry.name]
        if self.on_gpu and not entry.is_embedding and self.config.max_loaded_models > 1:
            if not flag_value(self.config.worker_args, "--kv-cache-fraction"):
                # Each model's KV cache takes its share of the GPU, so the next model still finds room.
                command += ["--kv-cache-fraction", f"{0.85 / self.config.max_loaded_models:.3f}"]
        for adapter in self.manager.adapters.of(entry.name):  # as they are now: a reload serves the later ones too
            command += ["--lora", f"{adapter.name}={adapter.spec}"]
        command += [] if entry.is_embedding else param_flags(self.config.params, entry.name)
        return command + ["--log-format", self.config.log_format, *self.config.worker_args]

    def _estimate(self, entry: Entry) -> int:
        kv = flag_value(self.config.worker_args, "--kv-cache-bytes")
        one = memory.estimate(
            entry,
            on_gpu=self.on_gpu,
            dtype=self.config.dtype,
            kv_cache_bytes=int(kv) if kv and kv.isdigit() else memory.DEFAULT_KV_BYTES,
        )
        return one * self.config.num_workers

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            if not self.entries:
                logger.error("no model to serve: name one with --model, or install the default (see README)")
                return 1
            self._list_models()
            if not self._load_first():
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

    def _list_models(self) -> None:
        for entry in self.entries:
            kind = "embedding" if entry.is_embedding else "chat"
            logger.info("model %s (%s): %s", entry.name, kind, entry.spec)
        for adapter in self.manager.adapters.entries.values():
            logger.info("model %s (LoRA adapter on %s): %s", adapter.name, adapter.card.parent, adapter.spec)
        keep = "forever" if self.config.keep_alive < 0 else f"{self.config.keep_alive:g}s"
        logger.info("up to %d model(s) loaded at once; keep_alive %s", self.config.max_loaded_models, keep)

    def _load_first(self) -> bool:
        """The first model listed is loaded before the gateways start, so `make serve` answers at once."""
        self.manager.load((b"", 0), self.entries[0].name, None)
        while not self.stopping:
            self.control.turn(100)
            answer = self.control.own.pop(0, None)
            if answer is not None:
                if answer.code != "ok":
                    logger.error("%s", answer.message)
                return answer.code == "ok"
            if self.manager.fatal:
                return False
        return False

    def _gateway_command(self, fd: int) -> list[str]:
        command = [sys.executable, "-m", "gateway", "--host", self.config.host, "--port", str(self.config.port)]
        command += ["--registry", self.control.address]
        command += ["--fd", str(fd), "--shutdown-grace", str(self.config.grace_period)]
        return command + ["--log-format", self.config.log_format, *self.config.gateway_args]

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

    def _wait_http(self) -> bool:
        """Until every gateway process has answered ready: they share the port, so until then a request could
        land on one that has not reached the supervisor yet and be refused. The control socket keeps turning:
        the gateways become ready by hearing from it."""
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
            self.control.turn(50 if pending else 200)
        return False

    def _supervise(self) -> int:
        while not self.stopping:
            self.control.turn(200)
            if self.manager.fatal:
                return 1
            for child in self.gateways:
                code = child.exit_code
                if code is None or self.stopping:
                    continue
                if self.metrics_dir and child.pid:
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
            self.control.turn(100)  # the workers stay supervised meanwhile
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
        self.manager.shutdown()
        for model in self.manager.models.values():
            for worker in model.workers:
                worker.child.stop(timeout=10)
        self.control.close()
        self.context.term()


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
    if config.ray is not None:
        from supervisor.ray_launch import RayLauncher  # imports ray only here

        return RayLauncher(config).run()
    return Launcher(config).run()


if __name__ == "__main__":
    sys.exit(main())
