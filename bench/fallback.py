"""`python bench/fallback.py`: decode tokens/s of each runner path, at 1 and 8 sequences.

The same model through every path that can run it: SmolLM2-135M (the default model, Llama: native, fallback batched,
fallback serial), and a random-weight Gemma3 of Gemma-3-270M's shape over SmolLM2's vocabulary (the two fallbacks).
Each sequence is prefilled with `--prompt` tokens, then `--steps` decode steps run all sequences together; tokens/s
counts the decoded tokens over the decode steps' time (runner forwards and a greedy argmax; no scheduler).
Repeat: `.venv/bin/python bench/fallback.py --batch 1 8 --steps 32 --rounds 3`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.fallback import FallbackRunner  # noqa: E402
from worker.fallback_serial import SerialRunner  # noqa: E402
from worker.malloc import keep_freed_memory  # noqa: E402
from worker.models import load_model  # noqa: E402
from worker.runner import ModelRunner, SeqChunk  # noqa: E402

BLOCK = 16


def gemma3_270m_shape(vocab_size: int) -> Any:
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tokens_per_second(runner: Any, batch: int, prompt: int, steps: int) -> float:
    per_seq = -(-(prompt + steps + 1) // BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    tokens = [[1 + (7 * j + i) % 1000 for j in range(prompt)] for i in range(batch)]
    for i in range(batch):  # prefill one by one, untimed
        logits = runner.forward([SeqChunk(tokens[i], 0, tables[i], prompt=True, key=i)])
        tokens[i].append(int(logits[0].argmax()))
    started = time.perf_counter()
    for _ in range(steps):
        chunks = [SeqChunk([seq[-1]], len(seq) - 1, tables[i], key=i) for i, seq in enumerate(tokens)]
        for seq, row in zip(tokens, runner.forward(chunks).argmax(dim=-1).tolist(), strict=True):
            seq.append(row)
    return batch * steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()
    loaded = load_model(None, device="cpu", dtype="float32", cache_dir=Path.home() / ".cache" / "tandem")
    num_blocks = max(args.batch) * -(-(args.prompt + args.steps + 1) // BLOCK) + 1
    device = loaded.device
    models: dict[str, tuple[Any, dict[str, Callable[[], Any]]]] = {}  # each model's paths, built on demand
    smollm2 = loaded.model
    gemma3 = gemma3_270m_shape(smollm2.config.vocab_size)
    for name, model, native in (("SmolLM2-135M (llama)", smollm2, True), ("Gemma3, 270M shape", gemma3, False)):
        shapes = FallbackRunner.probe(model, device)
        paths: dict[str, Callable[[], Any]] = {
            "fallback, batched": lambda m=model, s=shapes: FallbackRunner(
                m, device=device, num_blocks=num_blocks, block_size=BLOCK, shapes=s
            ),
            "fallback, serial": lambda m=model: SerialRunner(m, device=device, num_blocks=num_blocks),
        }
        if native:  # last: it fuses the model's q/k/v and gate/up weights in place (the HF modules keep views)
            paths["native"] = lambda m=model: ModelRunner(m, device=device, dtype=m.dtype, num_blocks=num_blocks)
        models[name] = (model, paths)
    runners = {(name, path): build() for name, (_, paths) in models.items() for path, build in paths.items()}
    # Rounds interleave the paths, and each figure is a path's best round: on a shared machine a neighbour's burst
    # slows one measurement, never speeds one up.
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(args.rounds):
        for (name, path), runner in runners.items():
            for batch in args.batch:
                rate = tokens_per_second(runner, batch, args.prompt, args.steps)
                best[name, path, batch] = max(rate, best.get((name, path, batch), 0.0))
    print(f"threads {torch.get_num_threads()}, float32, prompt {args.prompt}, {args.steps} decode steps, ", end="")
    print(f"best of {args.rounds} rounds\n")
    print("| model | path | " + " | ".join(f"{b} seq tok/s" for b in args.batch) + " |")
    print("|---|---|" + "---:|" * len(args.batch))
    for name, path in runners:
        print(f"| {name} | {path} | " + " | ".join(f"{best[name, path, b]:.1f}" for b in args.batch) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
