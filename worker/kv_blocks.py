"""Paged KV-cache bookkeeping with prefix caching. No torch: block ids only; the runner owns the memory.

A block holds `block_size` consecutive tokens of one sequence. Once full, a block is registered under
the hash of its tokens and of everything before it, so a later prompt that starts the same way
(the system prompt, the earlier turns of a chat) reuses it instead of recomputing it. Freed blocks keep
their contents and hash until they are handed out again, least recently freed first. A sequence with a LoRA
adapter starts its chain from the adapter's identity (`Sequence.cache_root`): its KV is not the base model's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from worker.sequence import Sequence


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = ()  # kept beside the hash so a hash collision can never serve wrong KV


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        on_release: Callable[[Sequence], None] | None = None,
    ) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.prefix_caching = prefix_caching  # off: every prompt is computed in full (for comparison runs)
        # Told whenever a sequence's KV is gone (finished, aborted, preempted): a runner that keeps its own state
        # per sequence (worker/fallback_serial.py) drops it then.
        self.on_release = on_release
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.by_hash: dict[int, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest cached prefix of `seq`'s tokens.

        At least one token is left uncomputed: the model must run on it to produce the next logits.
        """
        assert not seq.block_table and seq.num_computed == 0
        parent = seq.cache_root
        max_full = (seq.num_tokens - 1) // self.block_size if self.prefix_caching else 0
        for index in range(max_full):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = hash((parent, tokens))
            block_id = self.by_hash.get(key)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(key)
            parent = key
        seq.num_computed = seq.num_cached = len(seq.block_table) * self.block_size
        self.num_prefix_queries += seq.num_prompt_tokens
        self.num_prefix_hits += seq.num_cached

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the KV of the next `num_new_tokens` tokens of `seq`."""
        needed = self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            block_id, _ = self.free.popitem(last=False)
            self._forget(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)

    def register_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Hash the blocks that became full and computed in the last step, so later prompts can reuse them."""
        first = num_computed_before // self.block_size
        last = seq.num_computed // self.block_size
        if first == last or not self.prefix_caching:
            return
        assert len(seq.block_hashes) == first
        parent = seq.block_hashes[-1] if first > 0 else seq.cache_root
        for index in range(first, last):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = hash((parent, tokens))
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and key not in self.by_hash:
                block.hash, block.tokens = key, tokens
                self.by_hash[key] = block.id
            seq.block_hashes.append(key)
            parent = key

    def release(self, seq: Sequence) -> None:
        """Give back the sequence's blocks; their contents stay reusable until handed out again."""
        if self.on_release is not None:
            self.on_release(seq)
        for block_id in reversed(seq.block_table):  # the tail is the least likely to be shared: reuse it first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # nothing worth keeping: hand it out before cached blocks
                    self.free.move_to_end(block_id, last=False)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free.pop(block_id, None)
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self.by_hash.get(block.hash) == block_id:
            del self.by_hash[block.hash]
        block.hash, block.tokens = None, ()
