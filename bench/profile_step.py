"""`python bench/profile_step.py`: where one runner step's time goes, by torch operator (torch.profiler, CPU).

A decode step of `--batch` sequences with `--context` tokens cached each (dense weights, the GGUF file dequantized),
or with `--prefill N` one prompt chunk of N tokens instead. Prints the operators by self CPU time: oneDNN's
`_linear_pointwise` is the linear layers; `tandem::paged_decode_attention` decode attention, `tandem::rms_norm`,
`silu_mul`, `rotary` and `write_kv` the per-token steps (worker/csrc/); prefill attention (and decode attention with
`TANDEM_NATIVE=0`) is `index_select`, `baddbmm`, `_softmax` and `bmm` (gather the K/V blocks, scores, softmax,
weighted values), and the K/V write `index_copy_`. Repeat: `.venv/bin/python bench/profile_step.py --batch 64
--context 200`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.step import decode_chunks, prefill_chunk  # noqa: E402
from worker.malloc import keep_freed_memory  # noqa: E402
from worker.models import DTYPES, load_model  # noqa: E402
from worker.runner import ModelRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="decoding sequences")
    parser.add_argument("--context", type=int, default=200, help="cached tokens per decoding sequence")
    parser.add_argument("--prefill", type=int, default=0, help="profile one prompt chunk of this many tokens instead")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=5, help="steps profiled, after 3 untimed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rows", type=int, default=14, help="operators shown")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the worker does
    cache = Path.home() / ".cache" / "tandem"
    loaded = load_model(None, device="cpu", dtype=args.dtype, quantize="none", cache_dir=cache)
    chunks = [prefill_chunk(args.prefill)] if args.prefill else decode_chunks(args.batch, args.context)
    blocks = max(max(chunk.block_table) for chunk in chunks) + 1
    runner = ModelRunner(loaded.model, device=loaded.device, dtype=loaded.dtype, num_blocks=blocks)
    for _ in range(3):
        runner.forward(chunks)  # oneDNN primitives and rope tables are built lazily
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        for _ in range(args.steps):
            runner.forward(chunks)
    table = profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(f"{args.steps} steps, threads {torch.get_num_threads()}, {args.dtype}\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
