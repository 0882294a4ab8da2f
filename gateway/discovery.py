"""Where the workers are, when the pool is not fixed at start: each source answers with the set of worker addresses
it sees now, and the pool (gateway/workers.py) connects to new ones and drains the ones that went.

- a static list (`--worker`): never changes;
- a DNS name (`--worker-dns NAME:PORT`), e.g. a Kubernetes headless Service, resolved again every few seconds to
  all its addresses: one worker per address;
- Ray (`--worker-ray ADDRESS`, gateway/ray_discovery.py): the workers the launcher placed as Ray actors.

A source that cannot tell this time (DNS server unreachable, Ray busy) answers None, and the pool keeps what it said
last: a lookup failing is not every worker leaving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[tuple[Any, ...]]]]

# getaddrinfo's answers for "this name has no address": a headless Service with no pods is NXDOMAIN.
NO_ADDRESS = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}


class Discovery(Protocol):
    name: str

    async def resolve(self) -> set[str] | None:
        """The worker addresses this source sees now; None when it cannot tell this time."""
        ...

    async def close(self) -> None: ...


class StaticDiscovery:
    def __init__(self, addresses: list[str]) -> None:
        self.name = "static"
        self.addresses = set(addresses)

    async def resolve(self) -> set[str] | None:
        return set(self.addresses)

    async def close(self) -> None:
        pass


def parse_host_port(target: str) -> tuple[str, int]:
    """`NAME:PORT` (`[v6]:PORT` too) → (name, port); ValueError when it is not that."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--worker-dns takes NAME:PORT, not {target!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class DnsDiscovery:
    """Every address a name resolves to, as `tcp://ADDRESS:PORT`. ZeroMQ connects to each address, not to the name:
    a headless Service's name stands for all its pods, and a rescheduled pod's new address is a new worker."""

    def __init__(self, target: str, resolver: Resolver | None = None) -> None:
        self.name = f"dns {target}"
        self.host, self.port = parse_host_port(target)
        self._resolver = resolver
        self._failing = False

    async def resolve(self) -> set[str] | None:
        resolver = self._resolver or self._getaddrinfo
        try:
            answers = await resolver(self.host, self.port)
        except socket.gaierror as exc:
            if exc.errno in NO_ADDRESS:
                return set()  # the name exists no more, or has no address now: no workers there
            if not self._failing:
                logger.warning("%s: cannot resolve it now (%s); keeping its workers", self.name, exc)
            self._failing = True
            return None
        self._failing = False
        return {tcp_address(answer[4][0], self.port) for answer in answers}

    @staticmethod
    async def _getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
        return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)

    async def close(self) -> None:
        pass


def tcp_address(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"
