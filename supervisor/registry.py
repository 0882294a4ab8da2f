"""The model registry: what is available, what is loaded where, and every decision about it — load on demand
(concurrent first requests share one load), unload when keep_alive runs out, evict the least recently used idle
model to make room under the budget, never stop a model under a request.

Decisions only: processes come from an injected `spawn` (supervisor/processes.py in the launcher, fakes in tests),
messages from supervisor/control.py, which calls `tick()` every turn and sends what `answers` holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from common.control import Answer, AnswerCode, Beat, Placement, Registry
from supervisor.adapters import AdapterBook
from supervisor.processes import WorkerProcess, back_off
from worker.catalog import Entry

logger = logging.getLogger("launcher")

GATEWAY_TIMEOUT = 5.0  # seconds without a beat before a gateway's in-flight counts and acks no longer count
SIZE_EVERY = 5.0  # seconds between measurements of the workers' memory
GiB = 2**30
Waiter = tuple[bytes, int]  # (gateway peer, request id); b"" is the launcher itself (the model loaded at start)
State = Literal["waiting", "loading", "ready", "unloading"]


def key(name: str) -> str:
    """Names match case-insensitively, `:latest` implied (as the gateway's model_key)."""
    return name.strip().lower().removesuffix(":latest")


class NoRoom(Exception):
    """Nothing can be unloaded to make room: every other loaded model is busy."""


@dataclass(frozen=True)
class Budget:
    max_loaded: int  # models loaded at once
    keep_alive: float  # the default, in seconds; negative: forever
    free_memory: Callable[[], int]  # bytes free where the models go (RAM on CPU, the GPU's memory on a GPU)
    estimate: Callable[[Entry], int]  # bytes a model needs once loaded, before it is
    max_restarts: int = 5  # crashes of one worker within `restart_window` before the launcher gives up
    restart_window: float = 300.0


@dataclass(eq=False)
class Gateway:
    heard: float  # monotonic
    seen: int = 0
    catalog: int = 0
    busy: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Model:
    entry: Entry
    workers: list[WorkerProcess]
    estimate: int
    keep_alive: float
    last_used: float  # unix time of the last request or load
    state: State = "waiting"
    idle_since: float | None = None  # unix time the last request ended; None while busy or loading
    busy: int = 0  # requests in flight over all gateways
    waits_for: set[str] = field(default_factory=set)  # models being unloaded to make room for this one
    waiters: list[Waiter] = field(default_factory=list)  # Loads answered once ready
    unload_waiters: list[Waiter] = field(default_factory=list)  # Unloads answered once gone
    unload_version: int = 0  # the Registry version that took it out of service
    stopping: bool = False
    loaded_at: float = 0.0
    context_length: int = 0
    size: int = 0  # measured bytes (resident + GPU), once ready
    size_vram: int = 0  # of which on a GPU

    @property
    def name(self) -> str:
        return self.entry.name


class ModelManager:
    def __init__(
        self,
        entries: list[Entry],
        budget: Budget,
        spawn: Callable[[Entry], list[WorkerProcess]],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        adapters: list[Entry] | None = None,
    ) -> None:
        self.entries = {key(entry.name): entry for entry in entries}
        self.adapters = AdapterBook(self, adapters or [])  # LoRA adapters: models whose requests run on their base
        self.budget = budget
        self.spawn = spawn
        self.clock, self.monotonic = clock, monotonic
        self.models: dict[str, Model] = {}  # loaded, in any state
        self.gateways: dict[bytes, Gateway] = {}
        self.answers: list[tuple[Waiter, Answer]] = []  # to send
        self.deferred: list[tuple[Waiter, str, float | None]] = []  # loads waiting for an unload to finish
        self.version = 1
        self.catalog_version = 1
        self.fatal: str | None = None  # a worker crashed too often: the launcher gives up
        self._sized_at = 0.0

    # -- what gateways ask ------------------------------------------------------------------

    def load(self, waiter: Waiter, name: str, keep_alive: float | None) -> None:
        name = self.adapters.base_of(name) or name  # an adapter is loaded by loading its base
        entry = self.entries.get(key(name))
        if entry is None:
            return self._answer(waiter, "not_found", f"model '{name}' not found")
        model = self.models.get(key(name))
        if model is not None and model.state == "unloading":
            if model.stopping:
                self.deferred.append((waiter, name, keep_alive))  # loaded anew once this one is gone
                return
            logger.info("%s: asked for again while unloading; it stays", model.name)
            model.state = "ready"
            self._bump()
        if model is None:
            try:
                waits_for = self._make_room(entry)
            except NoRoom as exc:
                return self._answer(waiter, "busy", str(exc))
            model = Model(entry, self.spawn(entry), self.budget.estimate(entry), self.budget.keep_alive, self.clock())
            model.waits_for = waits_for
            self.models[key(name)] = model
            if not waits_for:
                self._start(model)
            self._bump()
        self.use(name, keep_alive)
        if model.state == "ready":
            self._answer(waiter, "ok")
        else:
            model.waiters.append(waiter)

    def unload(self, waiter: Waiter, name: str) -> None:
        name = self.adapters.base_of(name) or name
        if key(name) not in self.entries:
            return self._answer(waiter, "not_found", f"model '{name}' not found")
        model = self.models.get(key(name))
        if model is None:
            return self._answer(waiter, "ok")  # nothing loaded: as good as unloaded
        model.keep_alive = 0.0
        model.unload_waiters.append(waiter)
        if model.state == "ready" and model.busy == 0:
            self._begin_unload(model, "asked to")

    def use(self, name: str, keep_alive: float | None) -> None:
        """A request starts: it sets how long the model stays after it (Ollama: the latest request's keep_alive)."""
        model = self.models.get(key(self.adapters.base_of(name) or name))
        if model is None:
            return
        value = self.budget.keep_alive if keep_alive is None else keep_alive
        model.last_used = self.clock()
        if value != model.keep_alive:
            model.keep_alive = value
            self._bump()

    def add_adapter(self, waiter: Waiter, name: str, path: str, base: str | None) -> None:
        self.adapters.add(waiter, name, path, base)

    def remove_adapter(self, waiter: Waiter, name: str) -> None:
        self.adapters.remove(waiter, name)

    def beat(self, peer: bytes, beat: Beat) -> bool:
        """True when the gateway's view is stale (it gets the Registry)."""
        gateway = self.gateways.setdefault(peer, Gateway(self.monotonic()))
        gateway.heard, gateway.seen, gateway.catalog = self.monotonic(), beat.seen, beat.catalog
        gateway.busy = beat.busy
        for model in self.models.values():
            self._count_busy(model, self.clock())
        return beat.seen != self.version or beat.catalog != self.catalog_version

    # -- every turn of the loop -------------------------------------------------------------

    def tick(self) -> None:
        now, mono = self.clock(), self.monotonic()
        for peer, gateway in list(self.gateways.items()):
            if mono - gateway.heard > GATEWAY_TIMEOUT:
                logger.warning(
                    "gateway %s silent for %.0fs: its requests no longer hold models", peer.hex(), mono - gateway.heard
                )
                del self.gateways[peer]
        for model in list(self.models.values()):
            self._count_busy(model, now)
            match model.state:
                case "waiting" if not model.waits_for & self.models.keys():
                    self._start(model)
                case "loading":
                    self._poll_loading(model, now)
                case "ready":
                    self._poll_ready(model, now, mono)
                case "unloading":
                    self._poll_unloading(model)
        self.adapters.tick()
        if mono - self._sized_at >= SIZE_EVERY:
            self._sized_at = mono
            for model in self.models.values():
                if model.state == "ready":
                    self._measure(model)

    def state(self, with_catalog: bool) -> Registry:
        models = [entry.card for entry in self.entries.values()] + self.adapters.cards() if with_catalog else None
        placements = [self._placement(model) for model in self.models.values()]
        return Registry(self.version, self.catalog_version, placements, models)

    def shutdown(self) -> None:
        for model in self.models.values():
            for worker in model.workers:
                worker.stop()

    # -- decisions --------------------------------------------------------------------------

    def _make_room(self, entry: Entry) -> set[str]:
        """Unload least recently used idle models until `entry` fits the count and the memory; the new model
        starts once they are gone (the names returned). Raises NoRoom when the busy ones alone leave no room."""
        need = self.budget.estimate(entry)
        active = [m for m in self.models.values() if m.state != "unloading"]
        leaving = [m for m in self.models.values() if m.state == "unloading"]
        idle = sorted((m for m in active if m.state == "ready" and m.busy == 0), key=lambda m: m.last_used)
        starting = sum(m.estimate for m in active if m.state in ("waiting", "loading"))  # not taken yet, soon
        free = self.budget.free_memory() + sum(m.size or m.estimate for m in leaving) - starting
        chosen: list[Model] = []
        while len(active) - len(chosen) >= self.budget.max_loaded or need > free:
            if not idle:
                raise NoRoom(self._no_room(entry, len(active), need, free))
            victim = idle.pop(0)
            chosen.append(victim)
            free += victim.size or victim.estimate
        for victim in chosen:
            self._begin_unload(victim, f"to make room for {entry.name}")
        return {key(m.name) for m in [*chosen, *leaving]}

    def _no_room(self, entry: Entry, num_active: int, need: int, free: int) -> str:
        if num_active >= self.budget.max_loaded:
            return (
                f"cannot load '{entry.name}': {num_active} model(s) are loaded and busy "
                f"(--max-loaded-models {self.budget.max_loaded}); try again when one is idle"
            )
        return (
            f"cannot load '{entry.name}': it needs about {need / GiB:.1f} GiB and {free / GiB:.1f} GiB is free "
            "with every idle model unloaded"
        )

    def _start(self, model: Model) -> None:
        logger.info("loading %s from %s (about %.1f GiB)", model.name, model.entry.spec, model.estimate / GiB)
        model.state = "loading"
        for worker in model.workers:
            worker.start()

    def _poll_loading(self, model: Model, now: float) -> None:
        for worker in model.workers:
            if worker.has_exited:
                message = (
                    f"model '{model.name}' failed to load: its worker exited with code {worker.child.exit_code} "
                    "(the server log says why)"
                )
                logger.error("%s", message)
                for other in model.workers:
                    other.stop()  # its other replicas, if any
                for waiter in model.waiters:
                    self._answer(waiter, "failed", message)
                model.waiters.clear()
                self._remove(model)
                return
            worker.ping()
        if all(worker.is_ready for worker in model.workers):
            infos = [worker.info for worker in model.workers if worker.info is not None]
            model.state, model.loaded_at, model.idle_since = "ready", now, now if model.busy == 0 else None
            model.context_length = infos[0].models[0].context_length if infos and infos[0].models else 0
            self._measure(model)
            logger.info("%s ready on %s (%.1fs)", model.name, infos[0].device if infos else "?", now - model.last_used)
            self._bump()  # before the answers: each names the version that shows the model ready
            for waiter in model.waiters:
                self._answer(waiter, "ok")
            model.waiters.clear()

    def _poll_ready(self, model: Model, now: float, mono: float) -> None:
        for worker in model.workers:
            if worker.restart_at is not None:
                if mono >= worker.restart_at:
                    worker.start()
            elif worker.has_exited:
                self._crashed(worker, mono)
            else:
                worker.ping()
        idle = model.busy == 0 and model.idle_since is not None
        if idle and model.keep_alive >= 0 and now >= (model.idle_since or now) + model.keep_alive:
            self._begin_unload(model, "keep_alive 0" if model.keep_alive == 0 else "idle for its keep_alive")

    def _crashed(self, worker: WorkerProcess, mono: float) -> None:
        code = worker.child.exit_code
        crashes = worker.child.crashes = [t for t in worker.child.crashes if mono - t < self.budget.restart_window]
        crashes.append(mono)
        if len(crashes) > self.budget.max_restarts:
            self.fatal = (
                f"{worker.name} crashed {len(crashes)} times in {self.budget.restart_window:.0f}s "
                f"(last exit code {code}): giving up"
            )
            logger.error("%s", self.fatal)
            return
        delay = back_off(len(crashes))
        logger.warning("%s exited with code %s; restarting in %.1fs", worker.name, code, delay)
        worker.close()
        worker.restart_at = mono + delay

    def _begin_unload(self, model: Model, reason: str) -> None:
        logger.info("unloading %s (%s)", model.name, reason)
        model.state = "unloading"
        model.unload_version = self._bump()

    def _poll_unloading(self, model: Model) -> None:
        """Stopped once every live gateway has applied the version that took it out of service (so none will
        send it another request) and no request is in flight on it: none in any gateway, none in the worker."""
        if not model.stopping:
            for worker in model.workers:
                worker.ping()
            in_use = model.busy or any(worker.is_busy for worker in model.workers)
            if in_use or any(g.seen < model.unload_version for g in self.gateways.values()):
                return
            model.stopping = True
            for worker in model.workers:
                worker.stop()
        if all(worker.poll_stop() for worker in model.workers):
            logger.info("%s unloaded", model.name)
            self._remove(model)

    def _remove(self, model: Model) -> None:
        for worker in model.workers:
            worker.close()
        del self.models[key(model.name)]
        self._bump()
        for waiter in model.unload_waiters:
            self._answer(waiter, "ok")
        deferred, self.deferred = self.deferred, []
        for waiter, name, keep_alive in deferred:
            self.load(waiter, name, keep_alive)

    def _measure(self, model: Model) -> None:
        sizes = [worker.memory() for worker in model.workers]
        model.size_vram = sum(vram for _, vram in sizes)
        model.size = sum(resident for resident, _ in sizes) + model.size_vram

    def _count_busy(self, model: Model, now: float) -> None:
        busy = sum(gateway.busy.get(model.name, 0) for gateway in self.gateways.values())
        if busy == model.busy:
            return
        if busy == 0:
            model.idle_since = now
        elif model.busy == 0:
            model.idle_since, model.last_used = None, now
        model.busy = busy
        self._bump()

    def _placement(self, model: Model) -> Placement:
        now = self.clock()
        expires_at = None
        if model.keep_alive >= 0:
            expires_at = (model.idle_since if model.idle_since is not None else now) + model.keep_alive
        return Placement(
            name=model.name,
            addresses=[worker.address for worker in model.workers],
            state="loading" if model.state == "waiting" else model.state,
            expires_at=expires_at,
            size=model.size or model.estimate,
            size_vram=model.size_vram,
            context_length=model.context_length or model.entry.card.context_length,
            loaded_at=model.loaded_at,
        )

    def _bump(self) -> int:
        self.version += 1
        return self.version

    def _answer(self, waiter: Waiter, code: AnswerCode = "ok", message: str = "") -> None:
        self.answers.append((waiter, Answer(id=waiter[1], code=code, message=message, version=self.version)))
