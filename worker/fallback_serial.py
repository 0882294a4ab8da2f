"""The last resort: one forward per sequence, each with the cache object the model makes for itself.

For models whose forward does not take the paged cache (worker/fallback.py): older code paths that ask the cache
for its length, recurrent state instead of K/V. This is what `model.generate` does for one request, step by step,
so whatever transformers generates with, serves. Each sequence keeps its cache here, keyed by the sequence, until
the block manager releases the sequence (finished, aborted, preempted); a sequence that starts again from position 0
starts a fresh cache. The blocks the scheduler reserves only meter memory: nothing is shared, so prefix caching is
off (a shared block would claim a hit that no cache here holds).
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from worker.fallback import ProbeFailed, check_close, first_line
from worker.runner import SeqChunk

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SerialRunner:
    """Runs one engine step as one forward per chunk, each sequence on its own cache."""

    def __init__(self, model: PreTrainedModel, *, device: torch.device, num_blocks: int) -> None:
        self.model, self.device, self.num_blocks = model, device, num_blocks
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in parameters
        self.caches: dict[Hashable, Any] = {}

    def forward(self, chunks: list[SeqChunk]) -> Tensor:
        """Float32 logits [len(chunks), vocab] at the last token of each chunk; extends each sequence's cache."""
        if not chunks:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        return torch.stack([self._forward(chunk) for chunk in chunks])

    def release(self, key: Hashable) -> None:
        self.caches.pop(key, None)

    @torch.inference_mode()
    def _forward(self, chunk: SeqChunk) -> Tensor:
        if chunk.key is None:
            raise ValueError("a chunk without a sequence key: the serial runner keeps a cache per sequence")
        cache = None
        if chunk.start_pos > 0:
            cache = self.caches.get(chunk.key)
            if cache is None:
                raise ValueError(f"no cache for sequence {chunk.key!r} at position {chunk.start_pos}")
        end = chunk.start_pos + len(chunk.token_ids)
        kwargs: dict[str, Any] = {self._cache_argument: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = self.model(
            input_ids=torch.tensor([chunk.token_ids], device=self.device),
            # All ones, as generate passes it: some models (OPT, ALiBi ones) derive positions from it.
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            **kwargs,
        )
        returned = getattr(output, "cache", None)
        if returned is None:  # not `or`: a cache object can be falsy (its __len__ counts layers)
            returned = getattr(output, "past_key_values", None)
        if returned is None:
            raise ValueError("the model returned no cache")
        self.caches[chunk.key] = returned
        return output.logits[0, -1].float()

    @classmethod
    def probe(cls, model: PreTrainedModel, device: torch.device) -> int:
        """Prefill a sequence in chunks, decode two tokens, and compare each logit row with the model's own forward
        over the whole sequence. Returns the cache's bytes per token; raises ProbeFailed if anything differs."""
        vocab = int(model.config.vocab_size)
        tokens = [(7 * i + 1) % vocab for i in range(14)]
        runner = cls(model, device=device, num_blocks=1)
        try:
            with torch.inference_mode():
                want = model(input_ids=torch.tensor([tokens], device=device), use_cache=False).logits[0].float()
            done, sizes = 0, {}
            for n in (7, 5, 1, 1):
                got = runner.forward([SeqChunk(tokens[done : done + n], done, [], key="probe")])
                done += n
                check_close(got[0], want[done - 1], model.dtype)
                sizes[done] = _tensor_bytes(runner.caches["probe"])
        except ProbeFailed:
            raise
        except Exception as exc:
            raise ProbeFailed(f"{type(exc).__name__}: {first_line(exc)}") from exc
        # What one more token costs; a cache that does not grow (recurrent state) is metered as if spread over the
        # tokens it has seen, so the number of sequences stays bounded by memory either way.
        growth = (sizes[14] - sizes[7]) // 7
        return max(1, growth if growth > 0 else sizes[14] // 14)


def _tensor_bytes(cache: Any, depth: int = 0) -> int:
    """Bytes of the tensors a cache object holds (DynamicCache's layers, a recurrent cache's states)."""
    if isinstance(cache, Tensor):
        return cache.numel() * cache.element_size()
    if depth > 3:
        return 0
    if isinstance(cache, list | tuple):
        return sum(_tensor_bytes(item, depth + 1) for item in cache)
    if isinstance(cache, dict):
        return sum(_tensor_bytes(item, depth + 1) for item in cache.values())
    if hasattr(cache, "__dict__"):
        return sum(_tensor_bytes(item, depth + 1) for item in vars(cache).values())
    return 0
