"""The supervisor's model registry: load on demand (one load for concurrent asks), keep_alive, LRU eviction under
the count and memory budgets, never unloading under a request, restarts. Fake workers and a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from common.control import Beat
from common.protocol import ModelCard, WorkerInfo
from supervisor.registry import Budget, GiB, ModelManager
from worker.catalog import Entry


@dataclass
class FakeChild:
    exit_code: int | None = None
    crashes: list[float] = field(default_factory=list)
    pid: int = 1


@dataclass(eq=False)
class FakeWorker:
    """A WorkerProcess stand-in: `answer()` plays the worker describing itself, `die()` a crash."""

    name: str
    address: str
    child: FakeChild = field(default_factory=FakeChild)
    info: WorkerInfo | None = None
    answered: bool = False
    restart_at: float | None = None
    stopping_since: float | None = None
    starts: int = 0
    running: int = 0

    @property
    def is_ready(self) -> bool:
        return self.answered and self.restart_at is None and self.stopping_since is None

    @property
    def is_busy(self) -> bool:
        return self.running > 0

    @property
    def has_exited(self) -> bool:
        return self.child.exit_code is not None

    def start(self) -> None:
        self.starts += 1
        self.child.exit_code, self.answered, self.restart_at = None, False, None

    def answer(self) -> None:
        self.answered = True
        self.info = WorkerInfo("i", 1, [ModelCard(self.name, 512)], "cpu", 0.0, 8, 8)

    def die(self, code: int = 3) -> None:
        self.child.exit_code = code

    def ping(self) -> None:
        pass

    def stop(self) -> None:
        self.stopping_since = 0.0
        self.child.exit_code = 0

    def poll_stop(self) -> bool:
        return self.has_exited

    def close(self) -> None:
        pass

    def memory(self) -> tuple[int, int]:
        return (0, 0)


class Harness:
    def __init__(self, max_loaded: int = 3, free: int = 100 * GiB, keep_alive: float = 300.0, **budget: Any):
        self.now = 1000.0
        self.free = free
        self.entries = [entry("a"), entry("b"), entry("c")]
        self.workers: dict[str, list[FakeWorker]] = {}
        self.budget = Budget(
            max_loaded=max_loaded,
            keep_alive=keep_alive,
            free_memory=lambda: self.free,
            estimate=lambda e: GiB,
            **budget,
        )
        self.manager = ModelManager(self.entries, self.budget, self.spawn, clock=self.clock, monotonic=self.clock)

    def clock(self) -> float:
        return self.now

    def spawn(self, entry: Entry) -> list[Any]:
        worker = FakeWorker(entry.name, f"ipc://{entry.name}")
        self.workers.setdefault(entry.name, []).append(worker)
        return [worker]

    def worker(self, name: str) -> FakeWorker:
        return self.workers[name][-1]

    def ready(self, name: str) -> None:
        self.worker(name).answer()
        self.manager.tick()

    def answers(self) -> list[tuple[bytes, int, str]]:
        out = [(waiter[0], waiter[1], answer.code) for waiter, answer in self.manager.answers]
        self.manager.answers.clear()
        return out

    def beat(self, peer: bytes = b"g", **busy: int) -> None:
        """A gateway that has applied the current version, with `busy` requests in flight."""
        self.manager.beat(peer, Beat(seen=self.manager.version, catalog=self.manager.catalog_version, busy=busy))

    def states(self) -> dict[str, str]:
        return {p.name: p.state for p in self.manager.state(False).placements}


def entry(name: str) -> Entry:
    return Entry(name, f"/models/{name}", ModelCard(name, 512, capabilities=["completion"]))


def test_concurrent_first_requests_share_one_load() -> None:
    h = Harness()
    for request_id in range(8):
        h.manager.load((b"g", request_id), "A:latest", None)  # names match case-insensitively, :latest implied
    assert len(h.workers["a"]) == 1 and h.worker("a").starts == 1
    assert h.answers() == [] and h.states() == {"a": "loading"}
    h.ready("a")
    assert h.answers() == [(b"g", i, "ok") for i in range(8)] and h.states() == {"a": "ready"}
    h.manager.load((b"g", 9), "a", None)  # loaded: answered at once
    assert h.answers() == [(b"g", 9, "ok")] and h.worker("a").starts == 1


def test_unknown_model_is_not_found() -> None:
    h = Harness()
    h.manager.load((b"g", 1), "nope", None)
    h.manager.unload((b"g", 2), "nope")
    assert h.answers() == [(b"g", 1, "not_found"), (b"g", 2, "not_found")]


def test_idle_model_unloads_when_keep_alive_runs_out_and_not_before() -> None:
    h = Harness(keep_alive=300)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.beat()
    [placement] = h.manager.state(False).placements
    assert placement.expires_at == 1300.0
    h.now += 299
    h.manager.tick()
    assert h.states() == {"a": "ready"}
    h.now += 2
    h.manager.tick()  # expired: out of service; stopped once the gateway has seen that
    assert h.states() == {"a": "unloading"} and h.worker("a").stopping_since is None
    h.beat()
    h.manager.tick()
    assert h.states() == {} and h.worker("a").stopping_since is not None


def test_never_unloaded_under_a_request() -> None:
    h = Harness(keep_alive=0)  # "unload right after the request"
    h.beat(a=1)  # a request waits for the load
    h.manager.load((b"g", 1), "a", 0)
    h.ready("a")
    h.now += 60
    h.beat(a=1)  # still running
    h.manager.tick()
    assert h.states() == {"a": "ready"}  # busy: its keep_alive has not started
    h.beat()  # the request ended
    h.manager.tick()
    h.beat()  # the gateway applied "unloading"
    h.manager.tick()
    assert h.states() == {}


def test_a_request_in_the_worker_holds_the_unload_too() -> None:
    h = Harness()
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.worker("a").running = 1  # a gateway that died left a request in the worker
    h.manager.unload((b"g", 2), "a")
    h.beat()
    h.manager.tick()
    assert h.states() == {"a": "unloading"} and h.answers() == [(b"g", 1, "ok")]
    h.worker("a").running = 0
    h.manager.tick()
    assert h.states() == {} and h.answers() == [(b"g", 2, "ok")]


def test_unload_waits_for_every_live_gateway_to_apply_it() -> None:
    h = Harness()
    h.manager.load((b"g1", 1), "a", None)
    h.ready("a")
    h.beat(b"g1")
    h.beat(b"g2")
    h.manager.unload((b"g1", 2), "a")
    h.beat(b"g1")
    h.manager.tick()
    assert h.states() == {"a": "unloading"}  # g2 may still send it a request
    h.now += 10  # g2 went silent: its view no longer counts
    h.beat(b"g1")
    h.manager.tick()
    assert h.states() == {}


def test_asked_for_again_while_unloading_it_stays() -> None:
    h = Harness()
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.beat(b"g", a=1)
    h.manager.unload((b"g", 2), "a")  # keep_alive 0: unloads once idle
    h.beat(b"g")
    h.manager.tick()
    assert h.states() == {"a": "unloading"}
    h.manager.load((b"g2", 3), "a", None)
    assert h.states() == {"a": "ready"} and (b"g2", 3, "ok") in h.answers()


def test_least_recently_used_idle_model_makes_room() -> None:
    h = Harness(max_loaded=2)
    for name in ("a", "b"):
        h.manager.load((b"g", 1), name, None)
        h.ready(name)
        h.now += 1
    h.manager.use("a", None)  # a used last: b is the least recently used
    h.beat()
    h.manager.load((b"g", 2), "c", None)
    assert h.states() == {"a": "ready", "b": "unloading", "c": "loading"}
    assert "c" not in h.workers or h.worker("c").starts == 0  # waits for b's memory
    h.beat()
    h.manager.tick()  # b stopped and gone
    h.manager.tick()  # c starts
    assert h.states() == {"a": "ready", "c": "loading"} and h.worker("c").starts == 1


def test_busy_models_leave_no_room_and_say_so() -> None:
    h = Harness(max_loaded=1)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.beat(a=2)
    h.manager.tick()
    h.manager.load((b"g", 2), "b", None)
    [(_, answer)] = h.manager.answers[-1:]
    assert answer.code == "busy" and "--max-loaded-models 1" in answer.message
    assert h.states() == {"a": "ready"}


def test_memory_budget_evicts_then_refuses_with_the_figures() -> None:
    h = Harness(free=GiB // 2)
    h.manager.load((b"g", 1), "a", None)
    [(_, refused)] = h.manager.answers
    assert refused.code == "busy" and "needs about 1.0 GiB and 0.5 GiB is free" in refused.message
    h.manager.answers.clear()
    h.free = 2 * GiB
    h.manager.load((b"g", 2), "a", None)
    h.ready("a")
    h.free = GiB // 2  # a holds the rest now
    h.beat()
    h.manager.load((b"g", 3), "b", None)
    assert h.states() == {"a": "unloading", "b": "loading"}


def test_a_crashed_worker_restarts_with_back_off_then_the_launcher_gives_up() -> None:
    h = Harness(max_restarts=2)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    delays = []
    for _ in range(2):
        h.worker("a").die(3)
        h.manager.tick()
        delays.append(h.worker("a").restart_at - h.now)  # type: ignore[operator]
        h.now += 60
        h.manager.tick()  # restarted
        h.ready("a")
    assert delays == [0.5, 1.0] and h.worker("a").starts == 3 and h.manager.fatal is None
    h.worker("a").die(3)
    h.manager.tick()
    assert h.manager.fatal == "a crashed 3 times in 300s (last exit code 3): giving up"


def test_a_worker_that_dies_while_loading_fails_its_waiters() -> None:
    h = Harness()
    h.manager.load((b"g", 1), "a", None)
    h.worker("a").die(2)
    h.manager.tick()
    [(_, answer)] = h.manager.answers
    assert answer.code == "failed" and "exited with code 2" in answer.message and h.states() == {}


@pytest.mark.parametrize(("keep_alive", "expires_at"), [(-1.0, None), (0.0, 1000.0), (60.0, 1060.0)])
def test_each_request_sets_the_keep_alive(keep_alive: float, expires_at: float | None) -> None:
    h = Harness()
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.beat(a=1)
    h.manager.use("a", keep_alive)
    h.beat()  # idle from now
    h.manager.tick()
    [placement] = h.manager.state(False).placements
    assert placement.expires_at == expires_at


def test_a_model_still_loading_counts_against_the_memory() -> None:
    h = Harness(free=3 * GiB // 2)
    h.manager.load((b"g", 1), "a", None)  # 1 GiB of the 1.5 about to be taken
    h.manager.load((b"g", 2), "b", None)
    [(_, refused)] = h.manager.answers
    assert refused.code == "busy" and h.states() == {"a": "loading"}
