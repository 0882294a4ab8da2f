"""Child processes of the launcher: a plain Child (gateways), and a WorkerProcess — one model's worker on its own
ipc:// address, pinged until it describes itself, restarted with back-off when it dies after that.

Nothing here blocks: the supervisor's loop calls `poll()` on every worker each turn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from common.protocol import Ack, Failed, Info, LoadAdapter, UnloadAdapter, WorkerInfo, encode, to_gateway_decoder
from supervisor.memory import process_memory

logger = logging.getLogger("launcher")

HERE = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 10.0  # seconds a worker gets after SIGTERM before SIGKILL


@dataclass(eq=False)
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes
    pass_fds: tuple[int, ...] = ()
    env: dict[str, str] | None = None
    cpus: frozenset[int] | None = None  # the CPUs it may run on (None: the launcher's own)

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches only the launcher, which stops children in order.
        self.process = subprocess.Popen(
            self.command, cwd=HERE, start_new_session=True, pass_fds=self.pass_fds, env=self.env
        )
        if self.cpus is not None:
            # Set from here rather than in the child (preexec_fn is unsafe in a threaded parent); the worker starts
            # its OpenMP threads when it imports torch, well after this, so they all inherit it.
            with contextlib.suppress(OSError):  # exited already: its exit code tells
                os.sched_setaffinity(self.process.pid, self.cpus)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def exit_code(self) -> int | None:
        return self.process.poll() if self.process else None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

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


def cpu_slices(cpus: list[int], replicas: int) -> list[frozenset[int]]:
    """Disjoint, even slices of `cpus`, one per replica (round-robin single CPUs when there are fewer CPUs).

    Several CPU workers of one model on one host each start torch with a thread per core; on shared cores their
    OpenMP threads spin-wait on one another and every step stalls (two workers on this 2-core machine measured 10
    output tokens/s against one worker's 125). A slice each, threads to match, makes them neighbours instead."""
    cpus = sorted(cpus)
    if replicas >= len(cpus):
        return [frozenset({cpus[i % len(cpus)]}) for i in range(replicas)]
    size, extra = divmod(len(cpus), replicas)
    slices, start = [], 0
    for i in range(replicas):
        end = start + size + (1 if i < extra else 0)
        slices.append(frozenset(cpus[start:end]))
        start = end
    return slices


def back_off(crashes: int) -> float:
    """0.5 s, 1 s, 2 s … up to 30 s before the n-th restart."""
    return min(0.5 * 2 ** (crashes - 1), 30.0)


@dataclass(eq=False)
class WorkerProcess:
    """One worker of one model. The supervisor pings it (Info) while it loads, then every second: the answer says
    it is ready, and how busy it is."""

    child: Child
    address: str
    context: zmq.Context[zmq.Socket[bytes]]
    info: WorkerInfo | None = None  # its latest answer
    answered: bool = False  # since its current start
    started_at: float = 0.0  # monotonic, of the current start
    restart_at: float | None = None  # monotonic: restart scheduled after a crash
    stopping_since: float | None = None  # monotonic: SIGTERM sent (an unload)
    # Builds the command at each start, so a restart or a reload serves what the model has by then (its adapters).
    command_for: Callable[[], list[str]] | None = None
    replies: dict[int, Ack | Failed] = field(default_factory=dict)  # answers to messages sent with expect_reply
    _awaiting: set[int] = field(default_factory=set)
    _socket: zmq.Socket[bytes] | None = None
    _last_ping: float = 0.0
    _last_note: float = 0.0

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def is_ready(self) -> bool:
        return self.answered and self.restart_at is None and self.stopping_since is None

    @property
    def is_busy(self) -> bool:
        """Requests in it, by its latest answer (at most a second old)."""
        return self.info is not None and (self.info.num_running + self.info.num_waiting) > 0

    @property
    def has_exited(self) -> bool:
        return self.child.exit_code is not None

    def start(self) -> None:
        if self.command_for is not None:
            self.child.command = self.command_for()
        self.child.start()
        self.started_at = self._last_note = time.monotonic()
        self.restart_at, self.answered = None, False
        self.close()
        self._socket = self.context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.connect(self.address)

    def ping(self) -> None:
        """Ask the worker to describe itself (often while it loads, every second after) and read its answers."""
        socket, now = self._socket, time.monotonic()
        if socket is None:
            return
        if now - self._last_ping >= (1.0 if self.answered else 0.2) and socket.poll(0, zmq.POLLOUT):
            socket.send(encode(Info()), zmq.NOBLOCK)  # (nothing is queued while it is not connected)
            self._last_ping = now
        while socket.poll(0, zmq.POLLIN):
            message = to_gateway_decoder.decode(socket.recv())
            if isinstance(message, WorkerInfo):
                self.info, self.answered = message, True
            elif isinstance(message, Ack | Failed) and message.id in self._awaiting:
                self._awaiting.discard(message.id)
                self.replies[message.id] = message
        if not self.answered and now - self._last_note >= 5:
            self._last_note = now
            logger.info("%s: loading the model… %.0fs", self.name, now - self.started_at)

    def send(self, message: LoadAdapter | UnloadAdapter, expect_reply: bool = False) -> bool:
        """Send a message to the worker now; False if it cannot take it (not connected). Its answer, if expected,
        appears in `replies` after a later `ping()`."""
        if self._socket is None:
            return False
        try:
            self._socket.send(encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        if expect_reply:
            self._awaiting.add(message.id)
        return True

    def stop(self) -> None:
        """SIGTERM now; `poll_stop()` kills it if it has not exited within STOP_TIMEOUT."""
        self.close()
        self.restart_at = None
        self.stopping_since = time.monotonic()
        self.child.terminate()

    def poll_stop(self) -> bool:
        """True once the process is gone."""
        if self.child.process is None or self.has_exited:
            return True
        if self.stopping_since is not None and time.monotonic() - self.stopping_since > STOP_TIMEOUT:
            logger.warning("%s did not stop within %.0fs: killing it", self.name, STOP_TIMEOUT)
            self.child.kill()
        return False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def memory(self) -> tuple[int, int]:
        """(resident bytes, GPU bytes) of the worker process, once it has started."""
        pid = self.child.pid
        if not pid or self.info is None or self.has_exited:
            return 0, 0
        return process_memory(pid, on_gpu=self.info.device.startswith("cuda"))
