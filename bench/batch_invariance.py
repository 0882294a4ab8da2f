"""How often does a greedy request's output depend on its batch neighbours? (floating-point reduction order)

Runs the real engine in-process: each prompt alone, then all prompts together in one batch (plus sampled
neighbours), and counts prompts whose greedy output differs, and at which token it first diverged.

    .venv/bin/python bench/batch_invariance.py --prompts 32 --max-tokens 64 [--dtype float32]
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.protocol import ChatMessage, Delta, Done, Generate, SamplingParams  # noqa: E402
from worker.engine import Engine, EngineConfig  # noqa: E402
from worker.models import load_model  # noqa: E402
from worker.sequence import Prepared  # noqa: E402

SUBJECTS = ["a cat", "the sea", "a robot", "winter", "a train", "music", "a garden", "the moon", "a city", "rain"]
PEER = b"bench"


def requests(n: int, max_tokens: int) -> list[Generate]:
    return [
        Generate(
            id=i,
            model="m",
            messages=[ChatMessage("user", f"Tell me about {SUBJECTS[i % 10]} in {i % 3 + 2} sentences, #{i}.")],
            params=SamplingParams(temperature=0, max_tokens=max_tokens),
        )
        for i in range(n)
    ]


def run(engine: Engine, batch: list[Generate]) -> dict[int, str]:
    texts = {g.id: "" for g in batch}
    ready: queue.Queue[Prepared] = queue.Queue()  # intake runs on the engine's own thread
    for request in batch:
        assert not engine.add(PEER, request, ready=ready.put)
        assert not engine.admit(ready.get())
    pending = len(batch)
    while pending:
        for _, event in engine.step():
            if isinstance(event, Delta):
                texts[event.id] += event.text
            elif isinstance(event, Done):
                pending -= 1
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="as the worker's --dtype")
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt: the batched run then differs from the lone ones by batching alone",
    )
    args = parser.parse_args()
    loaded = load_model(None, dtype=args.dtype, cache_dir=Path.home() / ".cache" / "tandem")
    config = EngineConfig(max_running=args.prompts, kv_cache_bytes=1 << 30, prefix_caching=args.prefix_caching)
    engine = Engine(loaded, config)
    batch = requests(args.prompts, args.max_tokens)
    started = time.perf_counter()
    alone = {}
    for request in batch:
        alone.update(run(engine, [request]))
    together = run(engine, batch)
    differ = [i for i in alone if alone[i] != together[i]]
    for i in differ:
        a, b = alone[i], together[i]
        at = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
        print(
            f"prompt {i}: diverges at character {at}: alone …{a[max(0, at - 20) : at + 20]!r} "
            f"vs batched …{b[max(0, at - 20) : at + 20]!r}"
        )
    print(
        f"{len(differ)} of {len(batch)} greedy outputs differ between batch of 1 and batch of {len(batch)} "
        f"({args.max_tokens} tokens each, {loaded.dtype}, prefix caching {'on' if args.prefix_caching else 'off'}; "
        f"{time.perf_counter() - started:.0f}s)"
    )


if __name__ == "__main__":
    main()
