"""Workers that `launcher.py --ray` placed on a Ray cluster, found through Ray: each is a named actor
(`tandem-worker-…`, in the launcher's namespace) that answers with its worker's ZeroMQ address. ZeroMQ stays the
data path; Ray only says where the workers are.

The ray package is imported here only, when the gateway runs with --worker-ray. Ray's calls block, so each round
runs in a thread (off the main thread, Ray also leaves the gateway's SIGTERM handler alone). An actor that does not
answer within `timeout` — its node is gone, and Ray waits for room to restart it — counts as absent this round; it
keeps one call outstanding at most, so an actor that stays away piles nothing up, and answers once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

WORKER_PREFIX = "tandem-worker-"


class RayDiscovery:
    def __init__(self, address: str, namespace: str, timeout: float = 2.0) -> None:
        self.name = f"ray {address}"
        self.address = address  # "auto": the cluster this machine belongs to
        self.namespace = namespace
        self.timeout = timeout
        self._handles: dict[str, Any] = {}  # actor name → handle
        self._calls: dict[str, Any] = {}  # actor name → its outstanding address() call
        self._failed: set[str] = set()  # actors whose last call failed (logged once until they answer)

    async def resolve(self) -> set[str] | None:
        return await asyncio.to_thread(self._resolve)

    def _resolve(self) -> set[str] | None:
        import ray
        from ray.exceptions import RayError

        if not ray.is_initialized():
            # Ray's C++ core would print a stack trace for every SIGTERM (the normal way a gateway is stopped).
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
            ray.init(address=self.address, namespace=self.namespace, logging_level=logging.ERROR, log_to_driver=False)
        names = {name for name in ray.util.list_named_actors() if name.startswith(WORKER_PREFIX)}
        for name in set(self._handles) - names:  # stopped for good
            self._handles.pop(name)
            self._calls.pop(name, None)
        for name in sorted(names - set(self._calls)):
            try:
                handle = self._handles.get(name) or ray.get_actor(name)
            except ValueError:  # it went between the listing and now
                continue
            self._handles[name] = handle
            self._calls[name] = handle.address.remote()
        if not self._calls:
            return set()
        calls = list(self._calls.values())
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=self.timeout)
        found = set()
        for name, call in list(self._calls.items()):
            if call not in done:
                continue  # no answer yet: absent this round, asked again once it answers
            del self._calls[name]
            try:
                found.add(ray.get(call))
            except RayError as exc:  # restarting, or dead for good: a fresh handle next round
                if name not in self._failed:
                    logger.info("ray: %s is unavailable (%s)", name, type(exc).__name__)
                self._failed.add(name)
                self._handles.pop(name, None)
            else:
                self._failed.discard(name)
        return found

    async def close(self) -> None:
        pass
