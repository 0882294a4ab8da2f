"""`python bench/step.py`: milliseconds per runner step, the engine's inner loop without scheduling or sampling.

Times `ModelRunner.forward` for a batch of B decoding sequences (each with `--context` tokens already cached) and for
one prefill chunk of `--prefill` tokens (after `--prefill-at` cached ones), per dtype and weight format. The first
column is the baseline of the ratio column. Repeat:
`.venv/bin/python bench/step.py --dtypes float32 bfloat16 --batch 1 4 16 64`, or per weight format
`.venv/bin/python bench/step.py --dtypes bfloat16 --formats dense Q4_1 Q8_0 Q4_K_M int8 int4`; long contexts:
`.venv/bin/python bench/step.py --dtypes bfloat16 --prefill 256 --prefill-at 6000`; a loaded server's steps, decodes
beside a prompt chunk: `--mixed 16:160 60:148`.

Formats: dense (the GGUF file dequantized, `--quantize none`), a GGUF type (the shipped Q4_1 file's own tensors, or
one of tests/gguf_writer.py's re-encodings, written once into ~/.cache/tandem/quality), int8/int4 (`--quantize`),
GPTQ/AWQ/compressed-tensors (the dense weights packed by tests/prequantized_writer.py, written there too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gguf_writer import FILE_TYPES, write_file_type  # noqa: E402
from tests.prequantized_writer import SYNTHETIC, write_default_model  # noqa: E402
from worker.gguf_weights import read_gguf_weights  # noqa: E402
from worker.malloc import keep_freed_memory  # noqa: E402
from worker.models import DTYPES, default_model_path, load_model  # noqa: E402
from worker.prequantized import load_prequantized  # noqa: E402
from worker.quant import QuantWeight, quantize_model  # noqa: E402
from worker.runner import ModelRunner, SeqChunk  # noqa: E402

BLOCK = 16


def time_steps(runners: dict[str, ModelRunner], chunks: list[SeqChunk], repeats: int) -> dict[str, float]:
    """Median ms per runner over `repeats` rounds, one step of each runner a round: on a shared machine a
    neighbour's burst then lands on every column alike, and the median drops the rounds it hit."""
    for runner in runners.values():
        runner.forward(chunks)  # warm-up: oneDNN primitives and rope tables are built lazily
    times: dict[str, list[float]] = {column: [] for column in runners}
    for _ in range(repeats):
        for column, runner in runners.items():
            started = time.perf_counter()
            runner.forward(chunks)
            times[column].append(time.perf_counter() - started)
    return {column: statistics.median(values) * 1000 for column, values in times.items()}


def decode_chunks(batch: int, context: int) -> list[SeqChunk]:
    per_seq = -(-(context + 1) // BLOCK)
    return [
        SeqChunk(token_ids=[1 + i], start_pos=context, block_table=list(range(i * per_seq, (i + 1) * per_seq)))
        for i in range(batch)
    ]


def prefill_chunk(length: int, cached: int = 0) -> SeqChunk:
    """One prompt chunk of `length` tokens after `cached` ones, its blocks numbered from 0."""
    table = list(range(-(-(cached + length) // BLOCK)))
    return SeqChunk(token_ids=[1] * length, start_pos=cached, block_table=table, prompt=True)


def quantized_weights(model: torch.nn.Module, name: str, cache: Path) -> dict[str, QuantWeight]:
    if name == "dense":
        return {}
    if name in ("int8", "int4"):
        return quantize_model(model, name)
    if name in SYNTHETIC:
        [folder] = write_default_model(cache / "quality", [name], cache)
        return load_prequantized(folder, next(model.parameters()).dtype)[1]
    path = default_model_path() if name == "Q4_1" else write_file_type(default_model_path(), cache / "quality", name)
    return read_gguf_weights(path, model.config)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    formats = ["dense", "Q4_1", *FILE_TYPES, "int8", "int4", *SYNTHETIC]
    parser.add_argument("--formats", nargs="+", default=["dense"], choices=formats, help="weight formats")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--context", type=int, default=200, help="cached tokens per decoding sequence")
    parser.add_argument("--prefill", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prefill-at", type=int, default=0, help="cached tokens before each prefill chunk")
    parser.add_argument(
        "--mixed",
        nargs="*",
        default=[],
        metavar="B:P",
        help="steps of B decoding sequences beside one P-token prompt chunk, as a loaded server runs (e.g. 60:148)",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the worker does
    cache = Path.home() / ".cache" / "tandem"
    per_seq = -(-(args.context + 1) // BLOCK)
    mixed = [tuple(int(n) for n in case.split(":")) for case in args.mixed]
    widest = max(args.batch + [b for b, _ in mixed])
    longest = max(args.prefill + [p for _, p in mixed])
    blocks = widest * per_seq + -(-(args.prefill_at + longest) // BLOCK) + 1
    runners: dict[str, ModelRunner] = {}
    for dtype in args.dtypes:
        loaded = load_model(None, device="cpu", dtype=dtype, cache_dir=cache, quantize="none")
        for weights in args.formats:
            column = dtype if args.formats == ["dense"] else f"{dtype} {weights}"
            quantized = quantized_weights(loaded.model, weights, cache)
            runners[column] = ModelRunner(
                loaded.model, device=loaded.device, dtype=loaded.dtype, num_blocks=blocks, quantized=quantized
            )
    rows: dict[str, dict[str, float]] = {}
    for batch in args.batch:
        rows[f"decode B={batch}"] = time_steps(runners, decode_chunks(batch, args.context), args.repeats)
    for length in args.prefill:
        at = f" at {args.prefill_at}" if args.prefill_at else ""
        chunk = prefill_chunk(length, args.prefill_at)
        rows[f"prefill {length}{at}"] = time_steps(runners, [chunk], max(3, args.repeats // 4))
    for batch, length in mixed:  # the prompt's blocks after the decoders' (prefill_chunk numbers its own from 0)
        prompt = SeqChunk([1] * length, 0, [widest * per_seq + b for b in range(-(-length // BLOCK))], prompt=True)
        rows[f"decode B={batch} + prefill {length}"] = time_steps(
            runners, [*decode_chunks(batch, args.context), prompt], max(3, args.repeats // 2)
        )
    columns = list(runners)
    base = columns[0]
    print(f"threads {torch.get_num_threads()}, context {args.context}\n")
    print("| step | " + " | ".join(f"{c} ms" for c in columns) + " | " + f"{base} / others |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name, times in rows.items():
        ratios = ", ".join(f"{times[base] / times[c]:.2f}x" for c in columns[1:])
        print(f"| {name} | " + " | ".join(f"{times[c]:.1f}" for c in columns) + f" | {ratios or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
