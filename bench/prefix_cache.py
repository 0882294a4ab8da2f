"""`python bench/prefix_cache.py`: what prefix caching buys a chat UI, tandem with it against tandem without it.

Every request carries the same long system message (a chat UI's or an agent's instructions) before its own
user message, as `bench/load.py --system-words` makes them. tandem is started twice, with the default prefix
cache and with `--no-prefix-caching`, one after the other, and driven at each concurrency level. The table shows
the hit rate (prompt tokens the server reported as cached) and time to first token, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

from load import LevelResult, Workload, run_level
from run import RESULTS, ROOT, TANDEM_MODEL, free_port, ms, stop, wait_ready


def measure(prefix_caching: bool, args: argparse.Namespace, logs: Path) -> list[LevelResult]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker_args = [] if prefix_caching else ["--worker-arg=--no-prefix-caching"]
    command = [sys.executable, str(ROOT / "launcher.py"), "--host", "127.0.0.1", "--port", str(port), *worker_args]
    name = "cache" if prefix_caching else "no-cache"
    with (logs / f"tandem-{name}.log").open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, url, 300)
            workload = Workload(url=url, model=TANDEM_MODEL, max_tokens=args.max_tokens, system_words=args.system_words)
            results = []
            for concurrency in args.concurrency:
                result = asyncio.run(run_level(workload, concurrency, args.duration, warmup=args.warmup))
                print(
                    f"  {name:<9} c={concurrency:<3} TTFT {ms(result.ttft_p50)}/{ms(result.ttft_p95)} ms, "
                    f"{result.tokens_per_s:.1f} tok/s, hit rate {result.prefix_hit_rate}",
                    flush=True,
                )
                results.append(result)
            return results
        finally:
            stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--system-words", type=int, default=400, help="words in the shared system message")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    logs = RESULTS / f"logs-prefix-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    with_cache, without = measure(True, args, logs), measure(False, args, logs)
    print(f"\nshared system message of {args.system_words} words, {args.max_tokens} output tokens per request\n")
    print("| users | prompt tokens | hit rate | TTFT p50 ms cached / not | TTFT p95 ms | tok/s cached / not |")
    print("|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(with_cache, without, strict=True):
        hit = "-" if a.prefix_hit_rate is None else f"{a.prefix_hit_rate:.0%}"
        ttft = a.ttft_p50 and b.ttft_p50 and b.ttft_p50 / a.ttft_p50
        print(
            f"| {a.concurrency} | {a.mean_prompt_tokens or 0:.0f} | {hit} | {ms(a.ttft_p50)} / {ms(b.ttft_p50)}"
            f" ({ttft or 0:.1f}x) | {ms(a.ttft_p95)} / {ms(b.ttft_p95)} | {a.tokens_per_s:.1f} / {b.tokens_per_s:.1f}"
            f" ({a.tokens_per_s / b.tokens_per_s if b.tokens_per_s else 0:.2f}x) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
