"""`python bench/quality.py`: quality of each quantized weight format against its dense reference, as a table.

Per format: perplexity on all of tests/data/perplexity.txt (teacher-forced through the decode path) for the dense
reference and the integer kernels, and greedy agreement over the 16 prompts of tests/quality.py (share of positions
where the kernels pick the reference's token when fed the reference's tokens, and prompts whose free-running
greedy output is identical). A GGUF file's or a GPTQ/AWQ/compressed-tensors checkpoint's reference is its own
dequantization (`--quantize none`); the Q8_0, Q4_0, Q4_K_M and Q6_K files are re-encoded from the shipped Q4_1 file
(tests/gguf_writer.py), the GPTQ, AWQ and compressed-tensors checkpoints packed from its weights
(tests/prequantized_writer.py: the tools' layouts, round-to-nearest values), into --files-dir.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.gguf_writer import write_file_type  # noqa: E402
from tests.prequantized_writer import SYNTHETIC, write_default_model  # noqa: E402
from tests.quality import PROMPTS, TEXT, agreement, dense_gguf_model, greedy, perplexity, runner_for  # noqa: E402
from worker.gguf_weights import read_gguf_weights  # noqa: E402
from worker.models import default_model_path, load_model  # noqa: E402
from worker.prequantized import load_prequantized  # noqa: E402
from worker.quant import quantize_model  # noqa: E402

FORMATS = ["Q4_1", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "int8", "int4", *SYNTHETIC]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=0, help="perplexity over this many tokens (0: the whole text)")
    parser.add_argument("--steps", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--files-dir", type=Path, default=Path.home() / ".cache" / "tandem" / "quality")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cache = Path.home() / ".cache" / "tandem"
    loaded = load_model(None, device="cpu", dtype="float32", quantize="none", cache_dir=cache)
    base = copy.deepcopy(loaded.model).to(dtype)
    text = loaded.tokenizer.encode(TEXT.read_text())
    text = text[: args.tokens] if args.tokens else text
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    print(f"{len(text)} tokens of {TEXT.name}, {len(prompts)} prompts x {args.steps} greedy tokens, {args.dtype}\n")
    print("| format | kernels | reference | perplexity, reference | perplexity, kernels | ratio | greedy agreement |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in args.formats:
        started = time.perf_counter()
        if name in ("int8", "int4"):
            reference, quantized, what = base, quantize_model(base, name), "dense bf16 (Q4_1 dequantized)"
        elif name in SYNTHETIC:
            [folder] = write_default_model(args.files_dir, [name], cache)
            reference, quantized, _ = load_prequantized(folder, dtype)
            what = "its dequantization"
        else:
            path = default_model_path()
            if name != "Q4_1":
                path = write_file_type(path, args.files_dir, name)
            reference = base if name == "Q4_1" else dense_gguf_model(base, path, dtype)
            quantized, what = read_gguf_weights(path, base.config), "its dequantization"
        dense_runner, quant_runner = runner_for(reference, dtype, {}), runner_for(reference, dtype, quantized)
        kernels = ", ".join(sorted({k.name for k in _kernels(quant_runner)}))
        dense_ppl, quant_ppl = perplexity(dense_runner, text), perplexity(quant_runner, text)
        reference_tokens = greedy(dense_runner, prompts, args.steps)
        share, identical = agreement(reference_tokens, quant_runner, prompts)
        print(
            f"| {name} | {kernels} | {what} | {dense_ppl:.3f} | {quant_ppl:.3f} | {quant_ppl / dense_ppl:.4f} | "
            f"{share:.1%} ({identical}/{len(prompts)} identical) |",
            flush=True,
        )
        print(f"  ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return 0


def _kernels(runner: object) -> list:
    linears = [runner.lm_head] + [  # type: ignore[attr-defined]
        getattr(layer, n)
        for layer in runner.layers
        for n in ("qkv", "o_proj", "gate_up", "down")  # type: ignore[attr-defined]
    ]
    return [kernel for linear in linears if hasattr(linear, "quantized") for kernel in linear.quantized.kernels]


if __name__ == "__main__":
    sys.exit(main())
