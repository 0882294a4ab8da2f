"""One live request inside the worker: its tokens, how far its KV cache is computed, and its timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


RequestKey = tuple[bytes, int]  # (gateway peer identity, request id)


@dataclass(eq=False)
class Sequence:
    key: RequestKey
    token_ids: list[int]  # prompt followed by output
    num_prompt_tokens: int
    max_tokens: int  # output tokens allowed (already capped by the context length)
    status: Status = Status.WAITING
    num_computed: int = 0  # leading tokens whose KV is in the cache
    num_cached: int = 0  # prompt tokens that came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-chain hash of each full, computed block
    arrived_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    state: Any = None  # the engine's per-request state (sampling, detokenizer); opaque here
    adapter_id: int = 0  # the LoRA adapter it runs with (worker/lora_slots.py); 0: the base model
    adapter_slot: int = 0  # where the runner finds that adapter's weights

    @property
    def cache_root(self) -> int:
        """Where its prefix-cache hash chain starts: KV computed under one adapter is not KV of another."""
        return hash(("lora", self.adapter_id)) if self.adapter_id else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to feed the model: the rest of the prompt, or the last sampled token."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass(frozen=True)
class Prepared:
    """A request back from intake (worker/intake.py): its sequence, ready to schedule, or why it was refused."""

    key: RequestKey
    seq: Sequence | None = None
    error_code: str = ""
    error: str = ""
    adapter: Any = None  # (worker/lora_slots.Adapter, its weights if intake read them) for a LoRA request
