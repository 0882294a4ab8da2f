"""The Ray actors of `launcher.py --ray`: each runs one tandem process on its node — a worker
(`python -m worker --bind tcp://<node ip>:<free port> …`) or a gateway — as its child, and lives and dies with it.

- The child dies with the actor (PR_SET_PDEATHSIG): a node that is lost takes its actors, and must take their
  workers too, or they would serve on where neither Ray nor the gateways can account for them.
- The actor dies with the child: when the worker exits, so does the actor, and Ray restarts both (`max_restarts`),
  on this node or — when it is gone — on another with room, or once a node comes back.
- ZeroMQ with CURVE stays the data path: the keys arrive as constructor arguments and are written to a private
  folder on the node; Ray only places processes and, through named actors, says where they listen.

Nothing here imports torch: the actor process only starts and watches its child.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import logs

logger = logging.getLogger("launcher")

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT = 10.0
Keys = dict[str, str]  # relative path → the key file's text


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGKILL when the actor's process goes, however it goes."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port(ip: str) -> int:
    """A port free on `ip` now. The child binds it a moment later; another process taking it in between makes the
    child exit, and Ray restarts the actor on a new port."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((ip, 0))
        return int(probe.getsockname()[1])


def write_keys(keys: Keys) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tandem-curve-"))  # 0700
    for name, text in keys.items():
        path = folder / name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    return folder


def node_ip() -> str:
    import ray

    return str(ray.util.get_node_ip_address())


def tcp_address(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


class ProcessHost:
    """One child process; the actor exits when the child does, so that Ray restarts them."""

    def __init__(self, name: str, command: list[str], cwd: str) -> None:
        logs.configure()  # the actor's log goes to Ray's log files and, from there, to the launcher's output
        self.name = name
        self.stopping = False
        self.process = subprocess.Popen(command, cwd=cwd, preexec_fn=_die_with_parent)
        logger.info("%s: started (pid %d): %s", name, self.process.pid, " ".join(command))
        threading.Thread(target=self._watch, name="watch child", daemon=True).start()

    def _watch(self) -> None:
        code = self.process.wait()
        if self.stopping:
            return
        logger.error("%s exited with code %s: the actor exits too, for Ray to restart it", self.name, code)
        time.sleep(1.0)  # a child that fails at once does not make Ray spin
        os._exit(1)

    def pid(self) -> int:
        return self.process.pid

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit code. Before the actor is killed, so the child can
        finish its shutdown (a gateway drains, a worker ends its requests)."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class WorkerHost(ProcessHost):
    """A tandem worker listening on this node's address, found by the gateways through the actor's name."""

    def __init__(self, name: str, worker_args: list[str], keys: Keys | None, cwd: str) -> None:
        self._address = tcp_address(node_ip(), free_port(node_ip()))
        command = [sys.executable, "-m", "worker", "--bind", self._address, *worker_args]
        if keys:
            folder = write_keys(keys)
            command += ["--curve-secret-key", str(folder / "server.key_secret")]
            command += ["--curve-authorized-dir", str(folder / "authorized")]
        super().__init__(name, command, cwd)

    def address(self) -> str:
        return self._address


class GatewayHost(ProcessHost):
    """A tandem gateway on this node, finding the workers through Ray as any other gateway does."""

    def __init__(self, name: str, port: int, gateway_args: list[str], keys: Keys | None, cwd: str) -> None:
        ip = node_ip()
        self.port = port or free_port(ip)
        self._url = f"http://{ip}:{self.port}"
        command = [sys.executable, "-m", "gateway", "--host", "0.0.0.0", "--port", str(self.port), *gateway_args]
        if keys:
            folder = write_keys(keys)
            command += ["--curve-server-key", str(folder / "server.key")]
            command += ["--curve-client-key", str(folder / "client.key_secret")]
        super().__init__(name, command, cwd)

    def url(self) -> str:
        return self._url
