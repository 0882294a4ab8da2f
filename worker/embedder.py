"""The embedding engine: a BERT-style encoder (transformers' AutoModel), pooled as the model's sentence-transformers
config says (mean over the tokens for all-MiniLM-L6-v2), L2-normalised.

It serves the same loop as the chat Engine (worker/server.py): `embed()` tokenizes a request's inputs and queues
them; each `step()` encodes up to `max_batch` queued inputs together, whichever requests they belong to, shortest
first within the batch so padding stays small; a request is answered once all its inputs are done.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch

from common.protocol import (
    Done,
    Embed,
    Embeddings,
    Failed,
    Generate,
    LoadAdapter,
    ModelCard,
    Timings,
    ToGateway,
    UnloadAdapter,
    Usage,
    WorkerInfo,
)
from worker.catalog import folder_card
from worker.lora_slots import AdapterRead
from worker.models import ModelLoadError, pick_device, pick_dtype
from worker.sequence import Prepared

logger = logging.getLogger(__name__)

Outgoing = tuple[bytes, ToGateway]
Key = tuple[bytes, int]
POOLING_MODES = ("mean", "cls", "lasttoken")


@dataclass
class Encoder:
    model: Any  # a transformers PreTrainedModel (BertModel, …) in eval mode
    tokenizer: Any
    card: ModelCard
    device: torch.device
    pooling: str  # one of POOLING_MODES
    load_seconds: float


def is_encoder_folder(folder: Path) -> bool:
    """A sentence-transformers folder, or a bare encoder; worker/catalog.py decides the same way."""
    return (folder / "config.json").is_file() and "embedding" in folder_card(folder.name, folder).capabilities


def encoder_folder(spec: str) -> Path | None:
    """The folder `spec` names, if it holds an encoder: a path, or a hub id in the local cache."""
    folder = Path(spec).expanduser()
    if not folder.is_dir() and not spec.lower().endswith(".gguf") and not spec.startswith(("/", ".", "~")):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            return None
    return folder if folder.is_dir() and is_encoder_folder(folder) else None


def load_encoder(folder: Path, name: str, *, device: str = "auto", dtype: str = "auto") -> Encoder:
    """float32 unless told otherwise, on any device: the model is small, and its vectors should match the
    reference (sentence-transformers' fp32) to the fourth decimal of the cosine."""
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    chosen_device = pick_device(device)
    chosen_dtype = torch.float32 if dtype == "auto" else pick_dtype(dtype, chosen_device)
    card = folder_card(name, folder)
    try:
        model = AutoModel.from_pretrained(str(folder), dtype=chosen_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load encoder {str(folder)!r}: {exc}") from None
    model = model.to(chosen_device).eval()
    card = msgspec.structs.replace(card, dtype=str(chosen_dtype).removeprefix("torch."))
    encoder = Encoder(model, tokenizer, card, chosen_device, _pooling(folder), time.perf_counter() - started)
    logger.info("loaded encoder %s (%s pooling, %s) on %s", name, encoder.pooling, card.dtype, chosen_device)
    return encoder


def _pooling(folder: Path) -> str:
    import json

    try:
        config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return "mean"  # sentence-transformers' default for a bare encoder
    for mode in POOLING_MODES:
        if config.get(f"pooling_mode_{mode}_token") or config.get(f"pooling_mode_{mode}_tokens"):
            return mode
    if config.get("pooling_mode_lasttoken"):
        return "lasttoken"
    raise ModelLoadError(f"unsupported pooling in {folder / '1_Pooling' / 'config.json'} (served: {POOLING_MODES})")


@dataclass
class Pending:
    request: Embed
    arrived: float
    vectors: list[bytes | None]
    num_tokens: int
    remaining: int
    started: float | None = None


@dataclass
class EmbedderConfig:
    max_batch: int = 32  # inputs encoded together in one step
    max_waiting: int = 256  # requests queued before "busy"


@dataclass
class Embedder:
    encoder: Encoder
    config: EmbedderConfig = field(default_factory=EmbedderConfig)

    def __post_init__(self) -> None:
        self.pending: dict[Key, Pending] = {}
        self.queue: deque[tuple[Key, int, list[int]]] = deque()  # (request, input index, token ids)
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self._unreported_load = self.encoder.load_seconds
        self.num_running = 0

    @property
    def card(self) -> ModelCard:
        return self.encoder.card

    # -- requests in ------------------------------------------------------------------------

    def add(self, peer: bytes, request: Generate, ready: Callable[[Prepared], None]) -> list[Outgoing]:
        message = f'"{self.card.name}" does not support generate: it is an embedding model'
        return [(peer, Failed(id=request.id, code="bad_request", message=message))]

    def admit(self, prepared: Prepared) -> list[Outgoing]:
        return []  # no intake thread: add() answers at once

    def load_adapter(self, peer: bytes, request: LoadAdapter, ready: Callable[[AdapterRead], None]) -> list[Outgoing]:
        message = f'"{self.card.name}" takes no LoRA adapters: it is an embedding model'
        return [(peer, Failed(id=request.id, code="bad_request", message=message))]

    def adapter_read(self, peer: bytes, read: AdapterRead) -> list[Outgoing]:
        return []  # load_adapter answers at once

    def unload_adapter(self, peer: bytes, request: UnloadAdapter) -> list[Outgoing]:
        return [(peer, Failed(id=request.id, code="not_found", message=request.name))]

    def embed(self, peer: bytes, request: Embed) -> list[Outgoing]:
        key = (peer, request.id)
        if key in self.pending:
            return [(peer, Failed(id=request.id, code="bad_request", message=f"request id {request.id} is in flight"))]
        if len(self.pending) >= self.config.max_waiting:
            return [(peer, Failed(id=request.id, code="busy", message="server busy, please try again"))]
        try:
            ids = self._tokenize(request)
        except ValueError as exc:
            return [(peer, Failed(id=request.id, code="bad_request", message=str(exc)))]
        total = sum(len(i) for i in ids)
        self.pending[key] = Pending(request, time.monotonic(), [None] * len(ids), total, len(ids))
        self.queue.extend((key, index, token_ids) for index, token_ids in enumerate(ids))
        if not ids:
            return [self._answer(key)]
        return []

    def _tokenize(self, request: Embed) -> list[list[int]]:
        limit, vocab = self.card.context_length, self.card.vocab_size
        if request.dimensions is not None and request.dimensions > self.card.embedding_length:
            raise ValueError(f"dimensions must be at most {self.card.embedding_length} for {self.card.name}")
        texts = [(i, text) for i, text in enumerate(request.inputs) if isinstance(text, str)]
        encoded = self.encoder.tokenizer([t for _, t in texts], truncation=False)["input_ids"] if texts else []
        ids: list[list[int]] = [item if isinstance(item, list) else [] for item in request.inputs]
        for (index, _), token_ids in zip(texts, encoded, strict=True):
            ids[index] = list(token_ids)
        for index, token_ids in enumerate(ids):
            if not token_ids:
                raise ValueError(f"input {index} is empty")
            if any(not 0 <= t < vocab for t in token_ids):
                raise ValueError(f"input {index}: token ids must be 0 to {vocab - 1} for this model")
            if len(token_ids) > limit:
                if not request.truncate:
                    raise ValueError(f"input {index} is {len(token_ids)} tokens, longer than the context ({limit})")
                ids[index] = token_ids[: limit - 1] + token_ids[-1:]  # keeps the closing special token, as truncation
        return ids

    def abort(self, peer: bytes, request_id: int) -> list[Outgoing]:
        if self.pending.pop((peer, request_id), None) is None:
            return []
        self.queue = deque(item for item in self.queue if item[0] != (peer, request_id))
        return [(peer, Done(id=request_id, finish_reason="abort", usage=Usage(0, 0)))]

    def abort_peer(self, peer: bytes, reason: str) -> list[Outgoing]:
        keys = [key for key in self.pending if key[0] == peer]
        for key in keys:
            del self.pending[key]
        self.queue = deque(item for item in self.queue if item[0][0] != peer)
        return [(peer, Failed(id=key[1], code="unavailable", message=reason)) for key in keys]

    def fail_everything(self, message: str) -> list[Outgoing]:
        events: list[Outgoing] = [(k[0], Failed(id=k[1], code="internal", message=message)) for k in self.pending]
        self.pending.clear()
        self.queue.clear()
        return events

    def close(self) -> None:
        pass

    # -- the step ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> list[Outgoing]:
        batch = [self.queue.popleft() for _ in range(min(self.config.max_batch, len(self.queue)))]  # 1) schedule
        batch.sort(key=lambda item: len(item[2]))
        now = time.monotonic()
        for key, _, _ in batch:
            pending = self.pending.get(key)
            if pending is not None and pending.started is None:
                pending.started = now
        self.num_running = len(batch)
        try:
            vectors = self._encode([token_ids for _, _, token_ids in batch])  # 2) run
        except Exception as exc:
            logger.exception("an encoder step failed; failing its requests")
            keys = {key for key, _, _ in batch}
            return [self._fail(key, f"the encoder step failed: {type(exc).__name__}: {exc}") for key in keys]
        finally:
            self.num_running = 0
        out: list[Outgoing] = []  # 3) the requests whose last input this was are answered
        for (key, index, _), vector in zip(batch, vectors, strict=True):
            pending = self.pending.get(key)
            if pending is None:  # aborted meanwhile
                continue
            pending.vectors[index] = _to_bytes(vector, pending.request.dimensions)
            pending.remaining -= 1
            if pending.remaining == 0:
                out.append(self._answer(key))
        return out

    @torch.inference_mode()
    def _encode(self, batch: list[list[int]]) -> torch.Tensor:
        longest = max(len(ids) for ids in batch)
        pad = self.encoder.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in batch], device=self.encoder.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in batch], device=self.encoder.device)
        hidden = self.encoder.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
        if self.encoder.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.encoder.pooling == "lasttoken":
            pooled = hidden[torch.arange(len(batch)), mask.sum(1) - 1]
        else:  # mean over the real tokens, as sentence-transformers' Pooling does
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return pooled.cpu()

    def _answer(self, key: Key) -> Outgoing:
        pending = self.pending.pop(key)
        now = time.monotonic()
        started = pending.started or now
        self._unreported_load, load = 0.0, self._unreported_load
        timings = Timings(queue=started - pending.arrived, prefill=now - started, load=load)
        vectors = [v for v in pending.vectors if v is not None]
        return (key[0], Embeddings(id=key[1], vectors=vectors, num_prompt_tokens=pending.num_tokens, timings=timings))

    def _fail(self, key: Key, message: str) -> Outgoing:
        self.pending.pop(key, None)
        self.queue = deque(item for item in self.queue if item[0] != key)
        return (key[0], Failed(id=key[1], code="internal", message=message))

    # -- self-description -------------------------------------------------------------------

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            instance=self.instance,
            pid=os.getpid(),
            models=[self.card],
            device=str(self.encoder.device),
            started_at=self.started_at,
            max_running=self.config.max_batch,
            max_waiting=self.config.max_waiting,
            num_running=self.num_running,
            num_waiting=len(self.pending),
        )


def _to_bytes(vector: torch.Tensor, dimensions: int | None) -> bytes:
    """L2-normalised float32, little-endian; with `dimensions`, the first N kept and normalised again."""
    if dimensions is not None:
        vector = vector[:dimensions]
    vector = torch.nn.functional.normalize(vector.float(), dim=0)
    return vector.numpy().astype("<f4").tobytes()
