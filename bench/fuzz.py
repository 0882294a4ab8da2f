"""The long fuzzing run: the test suite's properties (tests/fuzzing.py) over many random cases per route.

By default against the same stack the test suite fuzzes — the real gateway and worker server and engine, a tiny
random model behind the real tokenizer (valid requests end within 64 tokens) — so tens of thousands of cases take
minutes. `--url` fuzzes a running tandem instead (the real model: start it with a small `--max-model-len` so valid
requests stay short). Prints the cases tried per route and any failure with its falsifying example.

    .venv/bin/python bench/fuzz.py --cases 5000 [--url http://127.0.0.1:8000] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.fuzzing import RAW_BODIES, ROUTES, Route, check_answer, encoded, mutated  # noqa: E402


@contextlib.contextmanager
def tiny_stack() -> Iterator[str]:
    from test_ops_harness import ipc_address, serve_gateway, serve_worker
    from tiny_model import smollm2_tokenizer, tiny_engine

    engine = tiny_engine(smollm2_tokenizer(), max_model_len=64)
    address = ipc_address()
    with serve_worker(engine, address), serve_gateway(address, request_timeout=60) as gateway:  # type: ignore[arg-type]
        gateway.wait_ready()
        yield gateway.base_url


def fuzz(url: str, model: str, cases: int, run_seed: int) -> dict[str, int]:
    options = settings(
        max_examples=cases,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    tried: dict[str, int] = {}

    def send(route: Route, content: bytes, label: str) -> None:
        headers = {"content-type": "application/json"}
        response = httpx.request(route.method, url + route.path, content=content, headers=headers, timeout=120)
        check_answer(route, response)
        tried[label] = tried.get(label, 0) + 1

    for route in ROUTES:
        fuzz_route(route, model, options, run_seed, send)

    @seed(run_seed)
    @options
    @given(raw=RAW_BODIES, route=st.sampled_from(ROUTES))
    def raw(raw: bytes, route: Route) -> None:
        send(route, raw, "raw bodies (every route)")

    raw()
    return tried


def fuzz_route(route: Route, model: str, options: settings, run_seed: int, send: Any) -> None:
    @seed(run_seed)
    @options
    @given(body=mutated(route, model))
    def one(body: dict[str, object]) -> None:
        send(route, encoded(body), route.path)

    one()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000, help="cases per route")
    parser.add_argument("--url", help="a running tandem (default: an in-process tiny stack)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(tiny_stack())
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        counts = fuzz(url, model, args.cases, args.seed)
        health = httpx.get(f"{url}/health").json()
    total = sum(counts.values())
    print(f"{total} cases in {time.perf_counter() - started:.0f}s, no property broken:")
    for path, count in counts.items():
        print(f"  {path}: {count}")
    held = [(w["running"], w["waiting"]) for w in health["workers"]]
    print(f"afterwards: health {health['status']}, workers (running, waiting) {held}")


if __name__ == "__main__":
    main()
