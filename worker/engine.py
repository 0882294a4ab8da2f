"""The engine: requests in, one batched model step at a time, per-request events out.

step() reads as schedule → run → sample → postprocess. Intake (template, tokenize, grammar; worker/intake.py)
runs on its own thread and hands back ready sequences; the output side (worker/output.py) turns sampled tokens
into events. Everything torch happens in the runner and the sampler; the scheduler and block manager decide, on
plain Python data, what runs. Every request that reaches the engine ends with exactly one Done or Failed.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec

from common.protocol import (
    Ack,
    Done,
    Embed,
    ErrorCode,
    Failed,
    Generate,
    LoadAdapter,
    ToGateway,
    UnloadAdapter,
    Usage,
    WorkerInfo,
)
from worker.adapters import Adapter, AdapterError, Adapters, NoFreeSlot
from worker.grammar import Grammars
from worker.intake import Intake, RequestError
from worker.kv_blocks import BlockManager
from worker.lora_slots import AdapterRead
from worker.memory import MemoryGauge
from worker.models import LoadedModel
from worker.output import Output, RequestState, done
from worker.runner import SeqChunk
from worker.runners import choose_runner
from worker.sampler import Sampler
from worker.scheduler import QueueFull, ScheduledChunk, Scheduler
from worker.sequence import Prepared, RequestKey, Sequence

logger = logging.getLogger(__name__)

Outgoing = tuple[bytes, ToGateway]  # (gateway peer, message)
# Steps in a row that may fail before the engine's state is no longer trusted and the worker restarts.
MAX_FAILED_STEPS = 3


class EngineBroken(Exception):
    """The engine's state can no longer be trusted: every request is failed and the worker exits for a restart."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64
    max_waiting: int = 256
    max_prefill_tokens: int = 256  # prompt tokens per step, beside the decodes: bounds how long a step stalls streams
    block_size: int = 16
    kv_cache_bytes: int = 2 << 30  # on CPU
    kv_cache_fraction: float = 0.85  # on a GPU: of the memory free after loading the weights
    max_model_len: int | None = None  # cap on context length (default: the model's)
    prefix_caching: bool = True  # reuse the KV of prompt prefixes seen before
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters served from the start: (name, PEFT folder)
    max_loras: int = 8  # LoRA adapters in memory at once (more may be registered: they load on use)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        chosen = choose_runner(loaded, self._kv_budget(), config.block_size)  # native, else a fallback: it logs which
        self.runner = chosen.runner
        self.context_length = min(chosen.context_length, config.max_model_len or chosen.context_length)
        self.card = msgspec.structs.replace(loaded.card(), context_length=self.context_length)
        num_blocks = self.runner.num_blocks
        prefix_caching = config.prefix_caching and chosen.prefix_caching
        if config.prefix_caching and not prefix_caching:
            logger.info("prefix caching off: the %s runner keeps no KV that sequences can share", chosen.path)
        self.blocks = BlockManager(
            num_blocks, config.block_size, prefix_caching=prefix_caching, on_release=chosen.on_release
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_running=config.max_running,
            max_waiting=config.max_waiting,
            max_prefill_tokens=config.max_prefill_tokens,
        )
        self.sampler = Sampler(len(self.tokenizer), loaded.eos_token_ids, loaded.device)
        self.grammars = Grammars(self.tokenizer, loaded.model.config.vocab_size, loaded.eos_token_ids)
        self.intake = Intake(self.tokenizer, self.card, self.grammars, self.sampler)
        self.output = Output(self.tokenizer, loaded.eos_token_ids, self.context_length)
        self.adapters = Adapters(self.runner, loaded.model.config, self.card, config.max_loras)
        self.adapters.register_at_start(list(config.loras))
        # One intake thread: requests are taken in, and so admitted, in the order they arrived.
        self._intake_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self.preparing: dict[RequestKey, float] = {}  # at intake, with their arrival time
        self._failed_steps = 0  # in a row
        self.instance = uuid.uuid4().hex
        self._unreported_load = loaded.load_seconds  # reported once, by the first request to finish
        self.started_at = time.time()
        self.memory = MemoryGauge(loaded.device)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.0f MiB)",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            num_blocks * chosen.bytes_per_block / 2**20,
        )

    def _kv_budget(self) -> int:
        if self.loaded.device.type == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(self.loaded.device)
            return int(free * self.config.kv_cache_fraction)
        return self.config.kv_cache_bytes

    def close(self) -> None:
        self._intake_thread.shutdown(wait=False, cancel_futures=True)

    # -- requests in ------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def add(self, peer: bytes, request: Generate, ready: Callable[[Prepared], None]) -> list[Outgoing]:
        """Start taking a request in; `ready` is called (on the intake thread) with the result, to pass to admit()."""
        try:
            return self._add(peer, request, ready)
        except Exception as exc:  # a bug: this request fails, the others run on (nothing was held yet)
            logger.exception("request %d: taking it in failed", request.id)
            message = f"the worker could not take this request in: {exc}"
            return [(peer, Failed(id=request.id, code="internal", message=message))]

    def _add(self, peer: bytes, request: Generate, ready: Callable[[Prepared], None]) -> list[Outgoing]:
        key = (peer, request.id)
        if key in self.preparing or self.scheduler.find(key) is not None:
            return [(peer, Failed(id=request.id, code="bad_request", message=f"request id {request.id} is in flight"))]
        adapter = None
        if request.adapter is not None:
            adapter = self.adapters.find(request.adapter)
            if adapter is None or adapter.error:
                code: ErrorCode = "not_found" if adapter is None else "bad_request"
                message = request.adapter if adapter is None else f"LoRA adapter '{adapter.name}': {adapter.error}"
                return [(peer, Failed(id=request.id, code=code, message=message))]
        try:
            self._intake_thread.submit(self._prepare, key, request, adapter, ready)
        except RuntimeError:  # shutting down
            return [(peer, Failed(id=request.id, code="unavailable", message="the worker is shutting down"))]
        self.preparing[key] = time.monotonic()
        return []

    def _prepare(
        self, key: RequestKey, request: Generate, adapter: Adapter | None, ready: Callable[[Prepared], None]
    ) -> None:
        """On the intake thread: whatever happens, exactly one Prepared goes back."""
        try:
            seq = self.intake.prepare(key, request)
            lora = None if adapter is None else (adapter, self.adapters.weights_for(adapter))
            prepared = Prepared(key, seq=seq, adapter=lora)
        except AdapterError as exc:
            prepared = Prepared(key, error_code="bad_request", error=f"LoRA adapter '{request.adapter}': {exc}")
        except RequestError as exc:
            prepared = Prepared(key, error_code=exc.code, error=exc.message)
        except Exception as exc:  # a bug or a tokenizer failure: this request fails, nothing else
            logger.exception("request %d: intake failed", request.id)
            prepared = Prepared(key, error_code="internal", error=f"the worker could not take this request in: {exc}")
        ready(prepared)

    def admit(self, prepared: Prepared) -> list[Outgoing]:
        """A request back from intake joins the queue (or fails)."""
        arrived = self.preparing.pop(prepared.key, None)
        if arrived is None:
            return []  # aborted while at intake: its Done went out then
        try:
            return self._admit(prepared, arrived)
        except Exception as exc:  # a bug: this request fails and gives back what it took, the others run on
            logger.exception("request %d: queueing it failed", prepared.key[1])
            if prepared.seq is not None:
                self._discard(prepared.seq)
            message = f"the worker could not queue this request: {exc}"
            return [(prepared.key[0], Failed(id=prepared.key[1], code="internal", message=message))]

    def _admit(self, prepared: Prepared, arrived: float) -> list[Outgoing]:
        peer, request_id = prepared.key
        if prepared.seq is None:
            code: Any = prepared.error_code
            return [(peer, Failed(id=request_id, code=code, message=prepared.error))]
        prepared.seq.arrived_at = arrived
        if prepared.adapter is not None:
            try:
                adapter, weights = prepared.adapter
                self.adapters.install(prepared.seq, adapter, weights, in_use=self._adapters_in_use())
            except (NoFreeSlot, AdapterError) as exc:
                code = "busy" if isinstance(exc, NoFreeSlot) else "bad_request"
                return [(peer, Failed(id=request_id, code=code, message=str(exc)))]
        try:
            self.scheduler.add(prepared.seq)
        except QueueFull:
            return [(peer, Failed(id=request_id, code="busy", message="server busy, please try again"))]
        logger.debug("request %s: %d prompt tokens queued", prepared.key, prepared.seq.num_prompt_tokens)
        return []

    def embed(self, peer: bytes, request: Embed) -> list[Outgoing]:
        """A chat model serves no embeddings (Ollama pools its hidden states; vLLM refuses, as here): they are not
        trained to compare texts, and a poor vector silently spoils a search index, where an error names the fix."""
        message = f'"{self.card.name}" does not support embeddings: use an embedding model'
        return [(peer, Failed(id=request.id, code="bad_request", message=message))]

    def abort(self, peer: bytes, request_id: int) -> list[Outgoing]:
        key = (peer, request_id)
        if self.preparing.pop(key, None) is not None:
            return [(peer, Done(id=request_id, finish_reason="abort", usage=Usage(0, 0)))]
        seq = self.scheduler.find(key)
        if seq is None:
            return []  # already finished: its Done is on the way
        seq.state.finish_reason = "abort"
        return [self._finish(seq)]

    def abort_peer(self, peer: bytes, reason: str) -> list[Outgoing]:
        """A gateway vanished or went silent: drop everything it asked for. If it is only paused, it learns why
        when it wakes (the events queue for it); if it is gone, the events go nowhere."""
        events: list[Outgoing] = []
        for key in [key for key in self.preparing if key[0] == peer]:
            del self.preparing[key]
            events.append((peer, Failed(id=key[1], code="unavailable", message=reason)))
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.key[0] == peer:
                events.append(self._fail(seq, "unavailable", reason))
        return events

    def fail_everything(self, message: str) -> list[Outgoing]:
        """Before the worker exits on a broken state: every request it holds ends with a Failed."""
        events: list[Outgoing] = [
            (key[0], Failed(id=key[1], code="internal", message=message)) for key in self.preparing
        ]
        self.preparing.clear()
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            events.append(self._fail(seq, "internal", message))
        return events

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[Outgoing]:
        chunks = self.scheduler.schedule()  # 1) schedule (a failure here leaves the books unknown: it propagates)
        if not chunks:
            return []
        try:
            finishing, result = self._run(chunks)  # 2) run, 3) sample
        except Exception as exc:
            return self._step_failed([chunk.seq for chunk in chunks], exc)
        self._failed_steps = 0
        out: list[Outgoing] = []  # 4) postprocess: detokenize, stop, emit; a failure ends that request alone
        for i, seq in enumerate(finishing):
            token, choice = result.token_ids[i], result.logprobs[i] if result.logprobs is not None else None
            if seq.state.forced:  # closing a think block at its budget: the sampled token gives way
                token, choice = seq.state.forced.popleft(), None
            try:
                delta = self.output.append(seq, token, choice)
            except Exception as exc:
                logger.exception("request %d: output processing failed", seq.key[1])
                out.append(self._fail(seq, "internal", f"the worker failed on this request's output: {exc}"))
                continue
            if delta is not None:
                out.append((seq.key[0], delta))
            if seq.state.finish_reason is not None:
                out.append(self._finish(seq))
        return out

    def _run(self, chunks: list[ScheduledChunk]) -> tuple[list[Sequence], Any]:
        logits = self.runner.forward(
            [
                SeqChunk(
                    c.seq.token_ids[c.seq.num_computed : c.seq.num_computed + c.num_tokens],
                    c.seq.num_computed,
                    c.seq.block_table,
                    prompt=c.seq.num_computed < c.seq.num_prompt_tokens,
                    key=c.seq.key,
                    adapter=c.seq.adapter_slot,
                )
                for c in chunks
            ]
        )
        self.scheduler.on_computed(chunks)
        rows = [i for i, c in enumerate(chunks) if c.completes]
        finishing = [chunks[i].seq for i in rows]
        if not rows:
            return [], None
        states: list[RequestState] = [seq.state for seq in finishing]
        logits = logits[rows]
        self.grammars.mask(logits, [s.constraint() for s in states])  # within each request's grammar
        return finishing, self.sampler.sample(logits, [s.sampling for s in states])

    def _step_failed(self, seqs: list[Sequence], exc: Exception) -> list[Outgoing]:
        """The step's requests fail with the reason; the others run on. Several failures in a row: restart."""
        self._failed_steps += 1
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise EngineBroken(f"{self._failed_steps} model steps in a row failed, the last with: {exc!r}") from exc
        logger.exception("a model step failed; failing its %d request(s)", len(seqs))
        message = f"the model step running this request failed: {type(exc).__name__}: {exc}"
        return [self._fail(seq, "internal", message) for seq in seqs]

    def _fail(self, seq: Sequence, code: ErrorCode, message: str) -> Outgoing:
        self._end(seq)
        logger.warning("request %d failed: %s", seq.key[1], message)
        return (seq.key[0], Failed(id=seq.key[1], code=code, message=message))

    def _finish(self, seq: Sequence) -> Outgoing:
        self._end(seq)
        # Ollama's load_duration is the load a request waited for: the model's load on a cold start, then ~0.
        self._unreported_load, load = 0.0, self._unreported_load
        return (seq.key[0], done(seq, load))

    def _end(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.adapter_id and self.adapters.slots.has_stale:  # an unloaded adapter's last request: free its memory
            self.adapters.reclaim(self._adapters_in_use())

    def _discard(self, seq: Sequence) -> None:
        """A request that failed on its way into the queue: out of it if it got in, its blocks and adapter freed."""
        if seq in self.scheduler.waiting or seq in self.scheduler.running:
            self._end(seq)
        else:
            self.blocks.release(seq)
            if seq.adapter_id and self.adapters.slots.has_stale:
                self.adapters.reclaim(self._adapters_in_use())

    # -- LoRA adapters at run time ------------------------------------------------------------

    def load_adapter(self, peer: bytes, request: LoadAdapter, ready: Callable[[AdapterRead], None]) -> list[Outgoing]:
        """Read the adapter on the intake thread (never on the step loop); `adapter_read` registers it."""
        try:
            self._intake_thread.submit(self._read_adapter, request, ready)
        except RuntimeError:
            return [(peer, Failed(id=request.id, code="unavailable", message="the worker is shutting down"))]
        return []

    def _read_adapter(self, request: LoadAdapter, ready: Callable[[AdapterRead], None]) -> None:
        try:
            read = AdapterRead(request, loaded=self.adapters.read(request.name, request.path))
        except AdapterError as exc:
            read = AdapterRead(request, error=str(exc))
        except Exception as exc:  # a bug, or torch refusing the tensors: this load fails, nothing else
            logger.exception("reading LoRA adapter %s failed", request.name)
            read = AdapterRead(request, error=f"the worker could not read the adapter: {exc}")
        ready(read)

    def adapter_read(self, peer: bytes, read: AdapterRead) -> list[Outgoing]:
        request: LoadAdapter = read.request
        if read.error:
            return [(peer, Failed(id=request.id, code="bad_request", message=read.error))]
        files, weights = read.loaded
        self.adapters.add(request.name, request.path, files, weights, in_use=self._adapters_in_use())
        return [(peer, Ack(id=request.id))]

    def unload_adapter(self, peer: bytes, request: UnloadAdapter) -> list[Outgoing]:
        if self.adapters.remove(request.name, self._adapters_in_use()) is None:
            return [(peer, Failed(id=request.id, code="not_found", message=request.name))]
        return [(peer, Ack(id=request.id))]

    def _adapters_in_use(self) -> set[int]:
        return {seq.adapter_id for seq in (*self.scheduler.running, *self.scheduler.waiting) if seq.adapter_id}

    # -- self-description -------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        queries = self.blocks.num_prefix_queries
        memory_used, memory_total = self.memory.read()
        return WorkerInfo(
            instance=self.instance,
            pid=os.getpid(),
            models=[self.card, *self.adapters.cards()],
            device=str(self.loaded.device),
            started_at=self.started_at,
            max_running=self.config.max_running,
            max_waiting=self.config.max_waiting,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.preparing),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            prefix_cache_hit_rate=self.blocks.num_prefix_hits / queries if queries else 0.0,
            num_accelerators=self.memory.num_accelerators,
            memory_used_bytes=memory_used,
            memory_total_bytes=memory_total,
        )
