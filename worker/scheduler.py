"""Which sequences run in the next step, and how many tokens each. No torch, so decisions test in milliseconds.

Order of service each step: sequences already decoding (one token each, never starved), then prompts
part-way through a chunked prefill, then new prompts from the queue. The prompt tokens of one step are
bounded (`max_prefill_tokens`), so a long prompt never freezes the streams already running. Decode tokens
do not count against that bound: when 64 streams decode, a shared budget left too little room for the
prompts of the requests that replace finished ones, and time to first token grew to 10 s (bench/run.py).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from worker.kv_blocks import BlockManager
from worker.sequence import RequestKey, Sequence, Status


class QueueFull(Exception):
    """The waiting queue is at its limit: the request is refused instead of queued forever."""


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq.token_ids[seq.num_computed:] to run this step
    completes: bool  # reaches the sequence's last token, so its logits are sampled


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_running: int, max_waiting: int, max_prefill_tokens: int) -> None:
        assert max_running > 0 and max_prefill_tokens > 0
        self.blocks = blocks
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is preempted first
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        # Requests that the next step will admit into free running slots are not waiting.
        free_slots = max(0, self.max_running - len(self.running))
        if len(self.waiting) >= self.max_waiting + free_slots:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        self.waiting.append(seq)

    def find(self, key: RequestKey) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.key == key:
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its cache at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's chunks and reserve their KV blocks."""
        budget = self.max_prefill_tokens  # prompt tokens only
        chunks: list[ScheduledChunk] = []
        for seq in list(self.running):  # 1) decoding: one token each, preempting the newest if blocks run out
            if seq.status is Status.RUNNING and not seq.is_prefilling and self._make_room(seq):
                chunks.append(self._reserve(seq, 1))
        for seq in list(self.running):  # 2) prompts part-way through a chunked prefill
            if budget > 0 and seq.is_prefilling:
                n = self._fit(seq, min(seq.num_uncomputed, budget))
                if n > 0:
                    chunks.append(self._reserve(seq, n))
                    budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_running:  # 3) new prompts
            seq = self.waiting[0]
            n = self._admit(seq, budget, alone=not chunks)
            if n == 0:
                break
            self.waiting.popleft()
            chunks.append(self._reserve(seq, n))
            budget -= n
        return chunks

    def on_computed(self, chunks: list[ScheduledChunk]) -> None:
        """Advance each sequence past the tokens the model just ran, and offer full blocks to the prefix cache."""
        for chunk in chunks:
            before = chunk.seq.num_computed
            chunk.seq.num_computed += chunk.num_tokens
            self.blocks.register_full_blocks(chunk.seq, before)

    def _reserve(self, seq: Sequence, n: int) -> ScheduledChunk:
        self.blocks.grow(seq, n)
        return ScheduledChunk(seq, n, completes=seq.num_computed + n == seq.num_tokens)

    def _admit(self, seq: Sequence, budget: int, *, alone: bool) -> int:
        """Move the head of the queue to running if a useful chunk of it fits; the chunk's size, or 0."""
        if not seq.block_table:
            self.blocks.match_prefix(seq)
        n = self._fit(seq, min(seq.num_uncomputed, budget))
        # A sliver of a prompt is not worth a slot while others run; alone, any progress is progress.
        if n == 0 or (n < seq.num_uncomputed and n < self.blocks.block_size and not alone):
            self.blocks.release(seq)  # next step starts with a fresh prefix match
            return 0
        seq.status = Status.RUNNING
        if seq.scheduled_at is None:
            seq.scheduled_at = time.monotonic()
        self.running.append(seq)
        return n

    def _fit(self, seq: Sequence, n: int) -> int:
        """The largest count <= n of seq's next tokens whose KV fits in its last block plus the free blocks."""
        room = len(seq.block_table) * self.blocks.block_size - seq.num_computed
        return max(0, min(n, room + self.blocks.num_free * self.blocks.block_size))

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt the newest running sequences until `seq` can take one more token; False if seq itself went."""
        while self._fit(seq, 1) < 1:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's cache and requeue it first; it recomputes (mostly from the prefix cache)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
