"""Test and bench support: perplexity and greedy agreement of one runner against another, on fixed text and prompts.

Both go through `ModelRunner.forward` one token at a time (teacher forcing on the decode path), which is the path
generated tokens take, so the kernels measured are the ones that serve.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from worker.runner import ModelRunner, SeqChunk

TEXT = Path(__file__).parent / "data" / "perplexity.txt"
BLOCK = 16
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "In 1969, the first person to walk on the moon was",
    "import numpy as np\nx = np.array([1, 2, 3])\nprint(",
    "The main difference between a virus and a bacterium is",
    "A haiku about autumn leaves:",
    "The French word for 'cat' is",
    "Photosynthesis is the process by which",
    "SELECT name, age FROM users WHERE",
    "The square root of 144 is",
    "My favourite book is",
]


def runner_for(model: torch.nn.Module, dtype: torch.dtype, quantized: dict, num_blocks: int = 512) -> ModelRunner:
    return ModelRunner(model, device=torch.device("cpu"), dtype=dtype, num_blocks=num_blocks, quantized=quantized)


def perplexity(runner: ModelRunner, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of tokens 1..n-1, each predicted from the tokens before it."""
    table = list(range(-(-len(token_ids) // BLOCK)))
    logits = runner.forward([SeqChunk(token_ids[:1], 0, table, prompt=True)])[0]
    total = 0.0
    for position in range(1, len(token_ids)):
        total -= torch.log_softmax(logits, dim=-1)[token_ids[position]].item()
        if position + 1 < len(token_ids):
            logits = runner.forward([SeqChunk([token_ids[position]], position, table)])[0]
    return math.exp(total / (len(token_ids) - 1))


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int, forced: list[list[int]] | None = None) -> list:
    """Greedy tokens of every prompt, all decoded in one batch. With `forced`, each step feeds the forced token
    instead of the runner's own choice (teacher forcing), so the answer is the runner's choice at each position."""
    tables, blocks = [], 0
    for ids in prompts:
        count = -(-(len(ids) + steps) // BLOCK)
        tables.append(list(range(blocks, blocks + count)))
        blocks += count
    logits = runner.forward([SeqChunk(ids, 0, t, prompt=True) for ids, t in zip(prompts, tables, strict=True)])
    chosen: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        tokens = logits.argmax(dim=-1).tolist()
        for row, token in enumerate(tokens):
            chosen[row].append(token)
        if step + 1 == steps:
            break
        feed = tokens if forced is None else [f[step] for f in forced]
        chunks = [SeqChunk([t], len(p) + step, table) for t, p, table in zip(feed, prompts, tables, strict=True)]
        logits = runner.forward(chunks)
    return chosen


def agreement(reference: list[list[int]], runner: ModelRunner, prompts: list[list[int]]) -> tuple[float, int]:
    """Share of positions where `runner` picks the reference's greedy token (fed the reference's tokens), and how
    many prompts' free-running greedy outputs are identical to the reference's."""
    steps = len(reference[0])
    forced = greedy(runner, prompts, steps, forced=reference)
    same = sum(
        a == b for ours, theirs in zip(forced, reference, strict=True) for a, b in zip(ours, theirs, strict=True)
    )
    free = greedy(runner, prompts, steps)
    identical = sum(ours == theirs for ours, theirs in zip(free, reference, strict=True))
    return same / (steps * len(prompts)), identical


def dense_gguf_model(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` holding the GGUF file's linear weights dequantized (what `--quantize none` serves)."""
    import gguf
    import gguf.quants

    from worker import gguf_weights

    config = model.config  # type: ignore[attr-defined]
    copied = copy.deepcopy(model).to(dtype)
    modules = dict(copied.named_modules())
    tensors = gguf.GGUFReader(path).tensors
    has_output = any(t.name == "output.weight" for t in tensors)
    for tensor in tensors:
        name = gguf_weights._module_name(tensor.name, has_output)
        if name is None:
            continue
        rows = int(tensor.shape[1])
        dense = torch.from_numpy(
            np.ascontiguousarray(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type))
        )
        dense = dense.reshape(rows, -1)
        kind = name.rsplit(".", 1)[-1]
        if kind in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads
            dense = dense[gguf_weights._unpermute_index(rows, heads)]
        with torch.no_grad():
            modules[name].weight.copy_(dense.to(dtype))
    return copied
