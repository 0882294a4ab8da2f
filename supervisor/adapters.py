"""LoRA adapters in the model registry: each is a model of its own (listed, routed by name) whose requests run on its
base model's worker. `--lora NAME=PATH` lists them at start; AddAdapter/RemoveAdapter (vLLM's load_lora_adapter and
unload_lora_adapter, through a gateway) change the list at run time.

Which base: the chat model named by the adapter's `base_model_name_or_path` (its full name, its last path component,
or the folder a model was loaded from), else the first chat model listed; a run-time load may name it. A base model's
workers start with `--lora` for each of its adapters, so a reload or a restart serves them again. An adapter added
while its base is loaded is sent to the base's workers first, and listed only once every one has read it: a folder that
does not fit the model is refused with the worker's reason, never listed.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from common.protocol import Ack, LoadAdapter, UnloadAdapter
from worker.adapter_files import AdapterError, read_adapter
from worker.catalog import CatalogError, Entry

if TYPE_CHECKING:
    from supervisor.registry import ModelManager, Waiter

logger = logging.getLogger("launcher")

ADD_TIMEOUT = 60.0  # seconds the base model's workers get to read a new adapter


def key(name: str) -> str:
    return name.strip().lower().removesuffix(":latest")


def adapter_entry(name: str, path: str, entries: list[Entry], base: str | None = None) -> Entry:
    """The adapter as a model: its base's card under its own name, `parent` the base. Raises CatalogError."""
    try:
        files = read_adapter(path)
    except AdapterError as exc:
        raise CatalogError(str(exc)) from None
    chat = [e for e in entries if not e.is_embedding and not e.card.parent]
    if not chat:
        raise CatalogError("there is no chat model to serve a LoRA adapter on")
    if base is not None:
        parent = next((e for e in chat if key(e.name) == key(base)), None)
        if parent is None:
            raise CatalogError(f"no chat model named '{base}' to serve the adapter on")
    else:
        parent = _named_base(files.base_model, chat) or chat[0]
    card = msgspec.structs.replace(
        parent.card,
        name=name,
        parent=parent.name,
        source=str(files.path),
        size_bytes=files.size_bytes,
        num_parameters=files.num_parameters,
        format="safetensors",
        quantization="",
    )
    return Entry(name, str(files.path), card)


def _named_base(base_model: str, chat: list[Entry]) -> Entry | None:
    if not base_model:
        return None
    wanted = {key(base_model), key(base_model.rstrip("/").rsplit("/", 1)[-1])}
    folder = Path(base_model).expanduser()
    for entry in chat:
        if key(entry.name) in wanted or key(Path(entry.spec).name) in wanted:
            return entry
        if folder.exists() and Path(entry.spec).expanduser().resolve() == folder.resolve():
            return entry
    return None


@dataclass(eq=False)
class PendingAdd:
    waiter: Waiter
    entry: Entry
    sent: dict[str, int] = field(default_factory=dict)  # worker address → LoadAdapter id
    acked: set[str] = field(default_factory=set)
    sent_at: float | None = None  # monotonic


class AdapterBook:
    def __init__(self, manager: ModelManager, entries: list[Entry]) -> None:
        self.manager = manager
        self.entries = {key(entry.name): entry for entry in entries}
        self.pending: list[PendingAdd] = []
        self._ids = itertools.count(1)

    def base_of(self, name: str) -> str | None:
        entry = self.entries.get(key(name))
        return entry.card.parent if entry is not None else None

    def of(self, base: str) -> list[Entry]:
        """The adapters of a base model: its workers start with them."""
        return [entry for entry in self.entries.values() if key(entry.card.parent) == key(base)]

    def cards(self) -> list:
        return [entry.card for entry in self.entries.values()]

    # -- what gateways ask ------------------------------------------------------------------

    def add(self, waiter: Waiter, name: str, path: str, base: str | None) -> None:
        taken = key(name) in self.entries or any(key(op.entry.name) == key(name) for op in self.pending)
        if taken:
            message = f"The lora adapter '{name}' has already been loaded; unload it first to load it again."
            return self.manager._answer(waiter, "invalid", message)
        if key(name) in self.manager.entries:
            return self.manager._answer(waiter, "invalid", f"'{name}' is the name of a model; choose another name")
        if not name.strip() or not path:
            return self.manager._answer(waiter, "invalid", "Both 'lora_name' and 'lora_path' must be provided.")
        try:
            entry = adapter_entry(name.strip(), path, list(self.manager.entries.values()), base)
        except CatalogError as exc:
            return self.manager._answer(waiter, "invalid", str(exc))
        self.pending.append(PendingAdd(waiter, entry))
        self.tick()

    def remove(self, waiter: Waiter, name: str) -> None:
        entry = self.entries.pop(key(name), None)
        if entry is None:
            return self.manager._answer(waiter, "not_found", f"The lora adapter '{name}' cannot be found.")
        logger.info("LoRA adapter %s unloaded", entry.name)
        base = self.manager.models.get(key(entry.card.parent))
        for worker in base.workers if base is not None else []:
            worker.send(UnloadAdapter(next(self._ids), entry.name))  # requests running with it finish with it
        self._listed()
        self.manager._answer(waiter, "ok")

    # -- every turn -------------------------------------------------------------------------

    def tick(self) -> None:
        for op in list(self.pending):
            base = self.manager.models.get(key(op.entry.card.parent))
            if base is None or base.state in ("waiting", "unloading"):  # its next start has it in --lora
                self._commit(op)
            elif base.state == "ready":
                self._send(op, base.workers)
            # loading: its process started without it; sent once ready

    def _send(self, op: PendingAdd, workers: list) -> None:
        now = time.monotonic()
        for worker in workers:
            if worker.address not in op.sent and worker.is_ready:
                request_id = next(self._ids)
                if worker.send(LoadAdapter(request_id, op.entry.name, op.entry.spec), expect_reply=True):
                    op.sent[worker.address] = request_id
                    op.sent_at = op.sent_at or now
            reply = worker.replies.pop(op.sent.get(worker.address, -1), None)
            if isinstance(reply, Ack):
                op.acked.add(worker.address)
            elif reply is not None:  # Failed: the worker's reason, e.g. the adapter was trained for another model
                self.pending.remove(op)
                for other in workers:
                    if other.address in op.acked:
                        other.send(UnloadAdapter(next(self._ids), op.entry.name))
                return self.manager._answer(op.waiter, "invalid", reply.message)
        if len(op.acked) == len(workers):
            self._commit(op)
        elif op.sent_at is not None and now - op.sent_at > ADD_TIMEOUT:
            self.pending.remove(op)
            message = f"the workers of '{op.entry.card.parent}' did not read the adapter within {ADD_TIMEOUT:.0f}s"
            self.manager._answer(op.waiter, "failed", message)

    def _commit(self, op: PendingAdd) -> None:
        self.pending.remove(op)
        self.entries[key(op.entry.name)] = op.entry
        logger.info("LoRA adapter %s (on %s): %s", op.entry.name, op.entry.card.parent, op.entry.spec)
        self._listed()
        self.manager._answer(op.waiter, "ok")

    def _listed(self) -> None:
        """The catalog changed: every gateway gets the new list with the next Registry."""
        self.manager.catalog_version += 1
        self.manager._bump()
