"""The engine's LoRA adapters: registering them (`--lora`, LoadAdapter), reading their weights off the step loop, and
putting them in the runner's slots as requests are admitted (worker/lora_slots.py decides which slot, and what to
evict). Each adapter is listed as a model card of its own, with the served model as its `parent`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import msgspec

from common.protocol import ModelCard
from worker.adapter_files import AdapterError, AdapterFiles, read_adapter
from worker.lora import LoraShapes, LoraWeights, load_lora
from worker.lora_slots import Adapter, AdapterSlots, NoFreeSlot, adapter_key
from worker.runner import ModelRunner
from worker.sequence import Sequence

logger = logging.getLogger(__name__)

__all__ = ["Adapter", "AdapterError", "Adapters", "NoFreeSlot"]


class Adapters:
    def __init__(self, runner: object, config: object, base: ModelCard, max_loras: int) -> None:
        # Only the native runner adds LoRA deltas; on a fallback path every adapter is refused with the reason.
        self.runner = runner if isinstance(runner, ModelRunner) else None
        self.shapes = LoraShapes.of(config) if self.runner is not None else None
        self.base = base
        self.slots = AdapterSlots(max_loras)
        self.files: dict[int, AdapterFiles] = {}  # by adapter id: what the cards say about each
        self._cards: list[ModelCard] | None = None  # built when asked (after every step), kept until a change
        if self.runner is not None:
            self.runner.loras = [None] * (max_loras + 1)

    def read(self, name: str, path: str) -> tuple[AdapterFiles, LoraWeights]:
        """The adapter's files and weights, checked against the model; raises AdapterError. Any thread."""
        if adapter_key(name) == adapter_key(self.base.name):
            raise AdapterError(f"'{name}' is the name of the model itself; give the adapter a name of its own")
        if self.runner is None or self.shapes is None:
            raise AdapterError(
                "LoRA adapters are served on the native runner only (llama, mistral, qwen2, qwen3); "
                "this model runs on transformers' own forward pass"
            )
        files = read_adapter(path)
        return files, load_lora(files, name, self.shapes, dtype=self.runner.dtype, device=self.runner.device)

    def _runner(self) -> ModelRunner:
        assert self.runner is not None, "an adapter reached a slot on a runner without LoRA"  # read() refuses them
        return self.runner

    def register_at_start(self, specs: list[tuple[str, str]]) -> None:
        """`--lora NAME=PATH`: each read now and kept in memory while slots last. One that fails is logged and
        registered broken, so requests naming it are told why instead of the worker refusing to start."""
        for name, path in specs:
            try:
                files, weights = self.read(name, path)
            except AdapterError as exc:
                logger.error("LoRA adapter %s (%s) cannot be served: %s", name, path, exc)
                self.slots.register(name, path, error=str(exc))
                continue
            self.add(name, path, files, weights, in_use=())

    def add(self, name: str, path: str, files: AdapterFiles, weights: LoraWeights, in_use: Collection[int]) -> Adapter:
        """Register an adapter read by `read` (replacing one of the same name: requests running with that one finish
        with it); it takes a free slot if there is one, else it loads on first use."""
        old = self.slots.find(name)
        adapter = self.slots.register(name, path)
        self.files[adapter.id] = files
        self._cards = None
        if old is not None:
            self.files.pop(old.id, None)
            self.reclaim(in_use)
        if self.slots.has_free:
            slot, _ = self.slots.place(adapter.id, in_use=())
            self._runner().loras[slot] = weights
        logger.info(
            "LoRA adapter %s from %s: rank %d on %d linears, %.1f MiB",
            name,
            path,
            files.rank,
            len(files.modules),
            weights.num_bytes / 2**20,
        )
        return adapter

    def remove(self, name: str, in_use: Collection[int]) -> Adapter | None:
        adapter = self.slots.unregister(name)
        if adapter is not None:
            self.files.pop(adapter.id, None)
            self._cards = None
            self.reclaim(in_use)
            logger.info("LoRA adapter %s unloaded", name)
        return adapter

    def find(self, name: str) -> Adapter | None:
        return self.slots.find(name)

    def weights_for(self, adapter: Adapter) -> LoraWeights | None:
        """On the intake thread: the weights of an adapter that is not in memory (None when it is), so the step loop
        only swaps a pointer. Raises AdapterError if the files changed into something unservable."""
        if adapter.id in self.slots.resident:
            return None
        return self.read(adapter.name, adapter.path)[1]

    def install(self, seq: Sequence, adapter: Adapter, weights: LoraWeights | None, in_use: Collection[int]) -> None:
        """Give the sequence its adapter's slot, placing the adapter in memory if it is not; raises NoFreeSlot."""
        slot = self.slots.slot(adapter.id)
        if slot is None:
            if weights is None:  # evicted between intake and now: read it here (rare)
                weights = self.read(adapter.name, adapter.path)[1]
            slot, evicted = self.slots.place(adapter.id, in_use)
            self._runner().loras[slot] = weights
            logger.debug("LoRA adapter %s placed in slot %d (evicted: %s)", adapter.name, slot, evicted)
        seq.adapter_id, seq.adapter_slot = adapter.id, slot

    def reclaim(self, in_use: Collection[int]) -> None:
        """Free the memory of unloaded adapters that no request uses any more."""
        for slot in self.slots.reclaim(in_use):
            self._runner().loras[slot] = None

    def cards(self) -> list[ModelCard]:
        """One card per servable adapter: the base model's, renamed, with the base as parent."""
        if self._cards is not None:
            return self._cards
        cards = []
        for adapter in self.slots.registered.values():
            files = self.files.get(adapter.id)
            if files is None:  # broken: not listed (the supervisor's listing still names it)
                continue
            cards.append(
                msgspec.structs.replace(
                    self.base,
                    name=adapter.name,
                    parent=self.base.name,
                    source=adapter.path,
                    size_bytes=files.size_bytes,
                    num_parameters=files.num_parameters,
                    format="safetensors",
                    quantization="",
                )
            )
        self._cards = cards
        return cards
