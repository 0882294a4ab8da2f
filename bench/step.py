"""`python bench/step.py`: milliseconds per runner step, the engine's inner loop without scheduling or sampling.

Times `ModelRunner.forward` for a batch of B decoding sequences (each with `--context` tokens already cached) and for
one prefill chunk of `--prefill` tokens, per dtype. The first dtype listed is the baseline of the ratio column.
Repeat: `.venv/bin/python bench/step.py --dtypes float32 bfloat16 --batch 1 4 16 64`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.malloc import keep_freed_memory  # noqa: E402
from worker.models import DTYPES, load_model  # noqa: E402
from worker.runner import ModelRunner, SeqChunk  # noqa: E402

BLOCK = 16


def time_step(runner: ModelRunner, chunks: list[SeqChunk], repeats: int) -> float:
    runner.forward(chunks)  # warm-up: oneDNN primitives and rope tables are built lazily
    started = time.perf_counter()
    for _ in range(repeats):
        runner.forward(chunks)
    return (time.perf_counter() - started) / repeats * 1000


def decode_chunks(batch: int, context: int) -> list[SeqChunk]:
    per_seq = -(-(context + 1) // BLOCK)
    return [
        SeqChunk(token_ids=[1 + i], start_pos=context, block_table=list(range(i * per_seq, (i + 1) * per_seq)))
        for i in range(batch)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context", type=int, default=200, help="cached tokens per decoding sequence")
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the worker does
    cache = Path.home() / ".cache" / "tandem"
    rows: dict[str, dict[str, float]] = {}
    for dtype in args.dtypes:
        loaded = load_model(None, device="cpu", dtype=dtype, cache_dir=cache)
        per_seq = -(-(args.context + 1) // BLOCK)
        blocks = max(max(args.batch) * per_seq, -(-max(args.prefill) // BLOCK)) + 1
        runner = ModelRunner(loaded.model, device=loaded.device, dtype=loaded.dtype, num_blocks=blocks)
        for batch in args.batch:
            rows.setdefault(f"decode B={batch}", {})[dtype] = time_step(
                runner, decode_chunks(batch, args.context), args.repeats
            )
        for length in args.prefill:
            chunk = SeqChunk(token_ids=[1] * length, start_pos=0, block_table=list(range(-(-length // BLOCK))))
            rows.setdefault(f"prefill {length}", {})[dtype] = time_step(runner, [chunk], max(3, args.repeats // 4))
        del runner, loaded
    base = args.dtypes[0]
    print(f"threads {torch.get_num_threads()}, context {args.context}\n")
    print("| step | " + " | ".join(f"{d} ms" for d in args.dtypes) + " | " + f"{base} / others |")
    print("|---|" + "---:|" * (len(args.dtypes) + 1))
    for name, times in rows.items():
        ratios = ", ".join(f"{times[base] / times[d]:.2f}x" for d in args.dtypes[1:])
        print(f"| {name} | " + " | ".join(f"{times[d]:.1f}" for d in args.dtypes) + f" | {ratios or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
