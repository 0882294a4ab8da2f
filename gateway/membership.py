"""Which workers the pool holds, when discovery decides (gateway/discovery.py): every few seconds each source says
what it sees; a new address is connected, a discovered worker no source sees any more is drained — it takes no new
request, those in flight run to their end (or fail at once if the worker died: its connection notices) — and is
dropped once nothing waits on it. An address that comes back while draining takes requests again.

The static `--worker` addresses are never drained; with the supervisor's registry the pool does not use this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from gateway.connection import WorkerConnection
from gateway.discovery import Discovery

if TYPE_CHECKING:
    from gateway.workers import WorkerPool

logger = logging.getLogger("gateway.workers")


class Membership:
    def __init__(self, pool: WorkerPool, sources: list[Discovery], interval: float, static: set[str]) -> None:
        self.pool = pool
        self.sources = sources
        self.interval = interval
        self.static = static
        self.found: dict[str, set[str]] = {}  # what each source said last, by its name
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.sources:
            self._task = asyncio.create_task(self._follow(), name="discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for source in self.sources:
            await source.close()

    async def _follow(self) -> None:
        while True:
            answers = await asyncio.gather(*(self._ask(source) for source in self.sources))
            for source, found in zip(self.sources, answers, strict=True):
                if found is not None:  # None: it could not tell this time; keep what it said before
                    self.found[source.name] = found
            self.reconcile(set().union(*self.found.values()))
            await asyncio.sleep(self.interval)

    @staticmethod
    async def _ask(source: Discovery) -> set[str] | None:
        try:
            return await source.resolve()
        except Exception:  # one failing source must stop neither the others nor the next round
            logger.exception("discovery %s failed; keeping its workers", source.name)
            return None

    def reconcile(self, found: set[str]) -> None:
        """Connect to every address found that the pool lacks; drain every discovered worker not found."""
        pool = self.pool
        known = {worker.address for worker in pool.workers}
        for address in sorted(found - known):
            logger.info("worker %s discovered: connecting", address)
            pool._add(address)
        for worker in list(pool.workers):
            if worker.address in self.static:
                continue
            if worker.address in found and worker.draining:
                logger.info("worker %s is back in discovery: taking requests again", worker.address)
                worker.draining = False
            elif worker.address not in found and not worker.draining:
                logger.info("worker %s left discovery: draining %d request(s)", worker.address, len(worker.queues))
                worker.draining = True
            self.settle(worker)
        pool._notify()

    def settle(self, worker: WorkerConnection) -> None:
        """A draining worker leaves the pool once nothing waits on it (a dead one has failed its requests)."""
        if worker.draining and not worker.queues and worker in self.pool.workers:
            logger.info("worker %s drained: dropped", worker.address)
            self.pool._drop(worker, "it left discovery", forget=True)
