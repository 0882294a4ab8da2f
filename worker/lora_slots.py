"""The worker's LoRA adapters by name, and which of them hold one of the runner's slots. No torch.

An adapter is registered (a name and a folder) by `--lora` or at run time (LoadAdapter), and takes a slot — its
weights in memory, where the runner reads them — when a request is admitted with it. At most `max_loras` are in
memory at once; to place another, the least recently used one that no request holds is evicted (adapters already
unregistered first). A request holds its adapter from admission until it ends, so its weights never change under it;
when every slot is held, the request is refused as busy rather than queued behind requests that may run for minutes.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any


def adapter_key(name: str) -> str:
    """Names match as model names do: case-insensitively, `:latest` implied."""
    return name.strip().lower().removesuffix(":latest")


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    # Unique in this process, never reused: what a sequence holds and what its prefix-cache hashes start from, so KV
    # computed under one adapter (or an earlier adapter of the same name) is never served to another.
    id: int
    error: str = ""  # its files could not be read: requests naming it fail with this


@dataclass(frozen=True)
class AdapterRead:
    """A LoadAdapter back from the intake thread: the adapter's (files, weights), or why it cannot be served."""

    request: Any  # common.protocol.LoadAdapter
    loaded: Any = None
    error: str = ""


class NoFreeSlot(Exception):
    """Every slot holds an adapter that requests are using."""


class AdapterSlots:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError("--max-loras must be at least 1")
        self.max_loras = max_loras
        self.registered: dict[str, Adapter] = {}  # by adapter_key(name)
        self.resident: OrderedDict[int, int] = OrderedDict()  # adapter id → slot, least recently used first
        self._free = list(range(max_loras, 0, -1))  # slots 1..max_loras; 0 is "no adapter"
        self._ids = itertools.count(1)

    def register(self, name: str, path: str, error: str = "") -> Adapter:
        """A new adapter under `name` (replacing any before it: that one's slot is reclaimed once unused)."""
        adapter = Adapter(name, path, next(self._ids), error)
        self.registered[adapter_key(name)] = adapter
        return adapter

    def unregister(self, name: str) -> Adapter | None:
        return self.registered.pop(adapter_key(name), None)

    def find(self, name: str) -> Adapter | None:
        return self.registered.get(adapter_key(name))

    def slot(self, adapter_id: int) -> int | None:
        """The adapter's slot if it is in memory, now its most recently used."""
        slot = self.resident.get(adapter_id)
        if slot is not None:
            self.resident.move_to_end(adapter_id)
        return slot

    def place(self, adapter_id: int, in_use: Collection[int]) -> tuple[int, int | None]:
        """A slot for the adapter, and the id of the adapter evicted to free it (None when one was free).
        Raises NoFreeSlot when every resident adapter is in `in_use`."""
        assert adapter_id not in self.resident
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            live = {adapter.id for adapter in self.registered.values()}
            unused = [i for i in self.resident if i not in in_use]  # least recently used first
            if not unused:
                raise NoFreeSlot(
                    f"all {self.max_loras} LoRA adapter slots are held by running requests (--max-loras); "
                    "try again shortly"
                )
            evicted = min(unused, key=lambda i: i in live)  # an unregistered one first, else the least recent
            slot = self.resident.pop(evicted)
        self.resident[adapter_id] = slot
        return slot, evicted

    def reclaim(self, in_use: Collection[int]) -> list[int]:
        """Free the slots of unregistered adapters no request holds any more; the slots freed."""
        live = {adapter.id for adapter in self.registered.values()}
        freed = []
        for adapter_id, slot in list(self.resident.items()):
            if adapter_id not in live and adapter_id not in in_use:
                del self.resident[adapter_id]
                self._free.append(slot)
                freed.append(slot)
        return freed

    @property
    def has_free(self) -> bool:
        return bool(self._free)

    @property
    def has_stale(self) -> bool:
        """Some adapter in memory is no longer registered (unloaded while requests used it)."""
        live = {adapter.id for adapter in self.registered.values()}
        return any(adapter_id not in live for adapter_id in self.resident)
