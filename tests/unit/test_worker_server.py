"""WorkerServer's own loop: what it does when told to stop at an awkward moment."""

from __future__ import annotations

import threading
import time
from typing import Any

from test_ops_harness import ScriptedEngine, ipc_address

from common.protocol import Delta
from worker.server import WorkerServer


class StoppedMidStep(ScriptedEngine):
    """SIGTERM lands while a step runs: the step still returns a batch of events to send."""

    def __init__(self) -> None:
        super().__init__()
        self.server: WorkerServer | None = None

    def has_work(self) -> bool:
        return True

    def step(self) -> list[tuple[bytes, Any]]:
        assert self.server is not None
        self.server.stop()
        time.sleep(0.5)  # long enough for the I/O thread to notice and close its end
        return [(b"gone", Delta(id=i, text="x")) for i in range(2000)]


def test_stop_during_a_step_with_events_left_to_send_still_returns() -> None:
    engine = StoppedMidStep()
    server = engine.server = WorkerServer(engine, ipc_address())  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "run() hung on sending to an I/O thread that had already stopped"
