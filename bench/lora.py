"""`python bench/lora.py`: what LoRA adapters cost a decode step, and how the batched delta is computed.

Step: milliseconds per `ModelRunner.forward` of B decoding sequences (`--context` tokens cached each) with 0, 1 or 4
adapters in the step (rank `--rank` on all seven projections, written as PEFT folders and read as the worker reads
them); with n adapters, row i uses adapter i mod n. Rounds step every configuration once, medians over `--repeats`.

`--kernels`: the per-step cost (30 layers × 4 fused linears of SmolLM2-135M) of three ways to add the deltas of
several adapters to one flat batch: `gather` (what the runner does: per adapter, its rows gathered, x A^T B^T, added
back), `masked` (every row through every present adapter's stacked A, masked to its own, then one B), `bmm` (each row's
own A and B gathered, then batched matmuls: Punica's BGMV without its fused GPU kernel).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adapter_files import MODULES, read_adapter  # noqa: E402
from worker.lora import LoraGroup, LoraShapes, LoraWeights, add_lora, load_lora  # noqa: E402
from worker.malloc import keep_freed_memory  # noqa: E402
from worker.models import DTYPES, load_model  # noqa: E402
from worker.runner import MIN_MATMUL_ROWS, ModelRunner, SeqChunk  # noqa: E402

BLOCK = 16


def write_adapter(folder: Path, shapes: LoraShapes, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every projection of every layer."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shapes.num_layers):
        for module in MODULES:
            in_features, out_features = shapes.features[module]
            part = "self_attn" if module in MODULES[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / rank
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def median_ms(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per case, one run of each case a round, so a neighbour's burst lands on every case alike."""
    for run in cases.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def decode_chunks(batch: int, context: int, adapters: int) -> list[SeqChunk]:
    per_seq = -(-(context + 1) // BLOCK)
    return [
        SeqChunk(
            [1 + i], context, list(range(i * per_seq, (i + 1) * per_seq)), adapter=i % adapters + 1 if adapters else 0
        )
        for i in range(batch)
    ]


def step_table(args: argparse.Namespace) -> None:
    loaded = load_model(
        None, device="cpu", dtype=args.dtype, cache_dir=Path.home() / ".cache" / "tandem", quantize="none"
    )
    shapes = LoraShapes.of(loaded.model.config)
    per_seq = -(-(args.context + 1) // BLOCK)
    runner = ModelRunner(
        loaded.model, device=loaded.device, dtype=loaded.dtype, num_blocks=max(args.batch) * per_seq + 1
    )
    with tempfile.TemporaryDirectory() as folder:
        runner.loras = [None] + [
            load_lora(read_adapter(write_adapter(Path(folder) / str(i), shapes, args.rank, i)), str(i), shapes,
                      dtype=loaded.dtype, device=loaded.device)
            for i in range(max(args.adapters))
        ]  # fmt: skip
    steps = {f"{b} {n}": decode_chunks(b, args.context, n) for b in args.batch for n in args.adapters}
    times = median_ms({name: functools.partial(runner.forward, chunks) for name, chunks in steps.items()}, args.repeats)
    print(f"{args.dtype}, threads {torch.get_num_threads()}, context {args.context}, rank {args.rank}\n")
    print("| decode step | " + " | ".join(f"{n} adapters" for n in args.adapters) + " | overhead |")
    print("|---|" + "---:|" * (len(args.adapters) + 1))
    for batch in args.batch:
        row = [times[f"{batch} {n}"] for n in args.adapters]
        overhead = ", ".join(f"+{(t / row[0] - 1) * 100:.0f}%" for t in row[1:])
        print(f"| B={batch} | " + " | ".join(f"{t:.1f} ms" for t in row) + f" | {overhead} |")


class Deltas:
    """One way of adding the deltas of `n` adapters to `batch` rows of SmolLM2-135M's four fused linears."""

    FUSED = [(576, 960, 3), (576, 576, 1), (576, 3072, 2), (1536, 576, 1)]  # (in, out, parts): qkv, o, gate_up, down

    def __init__(self, batch: int, n: int, rank: int, dtype: torch.dtype) -> None:
        self.slots = torch.arange(batch) % n
        self.x, self.out, self.pairs = [], [], []
        for in_features, out_features, parts in self.FUSED:
            r = rank * parts
            self.x.append(torch.randn(batch, in_features, dtype=dtype))
            self.out.append(torch.zeros(batch, out_features, dtype=dtype))
            pairs = [
                (torch.randn(r, in_features, dtype=dtype), torch.randn(out_features, r, dtype=dtype)) for _ in range(n)
            ]
            self.pairs.append(pairs)
        present = range(min(n, batch))
        rows = [None if n == 1 else (self.slots == a).nonzero().flatten() for a in present]
        self.groups = [[LoraGroup(LoraWeights("", [[p[a]]], 0), rows[a]) for a in present] for p in self.pairs]
        self.a_cat = [torch.cat([a for a, _ in p]) for p in self.pairs]
        self.b_cat = [torch.cat([b for _, b in p], dim=1) for p in self.pairs]
        self.mask = [
            (self.slots[:, None] == torch.arange(n).repeat_interleave(a.shape[0] // n)[None, :]).to(dtype)
            for a in self.a_cat
        ]
        self.a_stack = [torch.stack([a for a, _ in p]) for p in self.pairs]
        self.b_stack = [torch.stack([b for _, b in p]) for p in self.pairs]

    def gather(self) -> None:
        for i in range(len(self.FUSED)):
            add_lora(self.out[i], self.x[i], self.groups[i], 0, 0, MIN_MATMUL_ROWS)

    def masked(self) -> None:
        for i in range(len(self.FUSED)):
            self.out[i].addmm_(F.linear(self.x[i], self.a_cat[i]).mul_(self.mask[i]), self.b_cat[i].t())

    def bmm(self) -> None:
        for i in range(len(self.FUSED)):
            h = torch.bmm(self.x[i][:, None, :], self.a_stack[i][self.slots].transpose(1, 2))
            self.out[i].add_(torch.bmm(h, self.b_stack[i][self.slots].transpose(1, 2))[:, 0])


def kernel_table(args: argparse.Namespace) -> None:
    layers = 30
    print(f"{args.dtype}, threads {torch.get_num_threads()}, rank {args.rank}, {layers} layers × 4 linears\n")
    print("| rows | adapters | gather (the runner's) ms | masked ms | bmm ms |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        for n in [a for a in args.adapters if a]:
            deltas = Deltas(batch, n, args.rank, DTYPES[args.dtype])
            ways = {"gather": deltas.gather, "masked": deltas.masked, "bmm": deltas.bmm}
            times = median_ms(
                {name: functools.partial(repeat, way, layers) for name, way in ways.items()}, args.repeats
            )
            print(f"| {batch} | {n} | {times['gather']:.2f} | {times['masked']:.2f} | {times['bmm']:.2f} |")


def repeat(way: Callable[[], None], times: int) -> None:
    for _ in range(times):
        way()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=200, help="cached tokens per decoding sequence")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kernels", action="store_true", help="compare the ways to batch the deltas instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the worker does
    (kernel_table if args.kernels else step_table)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
