"""Which runner computes a model: the native one for the families it knows, else transformers' own forward pass.

1. native (worker/runner.py): Llama-family models, our own forward over the paged KV cache. The fast path.
2. fallback, batched (worker/fallback.py): any other model whose attention layers take the paged cache; all
   sequences of a step in one forward of the model's own code.
3. fallback, serial (worker/fallback_serial.py): whatever else transformers can run, one sequence at a time.

Each fallback is probed at start against the model's own forward; the first that reproduces it serves, and the log
says which path serves and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from worker.fallback import FallbackRunner, ProbeFailed
from worker.fallback_serial import SerialRunner
from worker.models import LoadedModel, ModelLoadError, context_length
from worker.runner import ModelRunner, SeqChunk, UnsupportedModel, check_supported
from worker.sequence import Sequence

logger = logging.getLogger(__name__)


class Runner(Protocol):
    num_blocks: int

    def forward(self, chunks: list[SeqChunk]) -> Tensor: ...


@dataclass(frozen=True)
class ChosenRunner:
    runner: Runner
    path: str  # "native", "fallback" or "fallback-serial"
    bytes_per_block: int
    context_length: int  # the longest context this runner computes exactly
    prefix_caching: bool  # whether KV blocks shared between sequences are real (else hits would be claimed falsely)
    on_release: Callable[[Sequence], None] | None = None  # for a runner that keeps state per sequence


def choose_runner(loaded: LoadedModel, kv_budget: int, block_size: int) -> ChosenRunner:
    """The runner for `loaded`, with as many KV blocks as `kv_budget` bytes hold (at least 2, else ValueError)."""
    model, config = loaded.model, loaded.model.config
    try:
        check_supported(model)  # first: the block size below reads config fields only the Llama family has
        bytes_per_block = ModelRunner.bytes_per_block(config, loaded.dtype, block_size)
        num_blocks = _num_blocks(kv_budget, bytes_per_block)
        runner = ModelRunner(
            model,
            device=loaded.device,
            dtype=loaded.dtype,
            num_blocks=num_blocks,
            block_size=block_size,
            quantized=loaded.quantized,
        )
    except UnsupportedModel as why:  # raised before the runner touches the model (and its fused weights are views)
        return _fallback(loaded, kv_budget, block_size, str(why))
    logger.info("%s (%s): native runner", loaded.name, config.model_type)
    return ChosenRunner(runner, "native", bytes_per_block, loaded.context_length, prefix_caching=True)


def _fallback(loaded: LoadedModel, kv_budget: int, block_size: int, why: str) -> ChosenRunner:
    model, device = loaded.model, loaded.device
    model_type = model.config.model_type
    # Both fallbacks mask sliding windows as the model does, so the context is not capped at the window.
    longest = context_length(model.config, cap_at_sliding_window=False)
    try:
        shapes = FallbackRunner.probe(model, device)
    except ProbeFailed as failed:
        batched_failure = str(failed)
    else:
        bytes_per_block = FallbackRunner.bytes_per_block(shapes, block_size)
        num_blocks = _num_blocks(kv_budget, bytes_per_block)
        runner = FallbackRunner(model, device=device, num_blocks=num_blocks, block_size=block_size, shapes=shapes)
        logger.info(
            "%s (%s): fallback path: transformers' own forward pass, all sequences of a step in one batch over the "
            "paged KV cache (the native runner, faster, does not run it: %s)",
            loaded.name,
            model_type,
            why,
        )
        # The KV lives in the blocks the scheduler shares, so a shared block is a real hit.
        return ChosenRunner(runner, "fallback", bytes_per_block, longest, prefix_caching=True)
    try:
        bytes_per_token = SerialRunner.probe(model, device)
    except ProbeFailed as failed:
        raise ModelLoadError(
            f"cannot serve model type {model_type!r}: the native runner does not run it ({why}), and transformers' "
            f"forward fails through the paged cache ({batched_failure}) and one sequence at a time ({failed})"
        ) from None
    bytes_per_block = bytes_per_token * block_size
    serial = SerialRunner(model, device=device, num_blocks=_num_blocks(kv_budget, bytes_per_block))
    logger.info(
        "%s (%s): fallback path, serial: transformers' own forward pass, one sequence at a time, prefix caching off "
        "(the native runner does not run it: %s; the paged cache does not fit its forward: %s)",
        loaded.name,
        model_type,
        why,
        batched_failure,
    )

    def release(seq: Sequence) -> None:
        serial.release(seq.key)

    return ChosenRunner(serial, "fallback-serial", bytes_per_block, longest, prefix_caching=False, on_release=release)


def _num_blocks(kv_budget: int, bytes_per_block: int) -> int:
    num_blocks = kv_budget // bytes_per_block
    if num_blocks < 2:
        raise ValueError("the KV cache budget holds fewer than 2 blocks; raise --kv-cache-bytes")
    return num_blocks
