"""Do running streams stall while a heavy request is taken in? Inter-token latency of 16 streams while a
6,000-token prompt and a request with a 50-property JSON Schema arrive.

Templating, tokenizing and grammar compilation used to run on the thread that steps the model; this measures
what the streams feel when they do. Each round: 16 greedy streams decode (ignore_eos); once they are steady, the
two heavy requests arrive together (a fresh schema each round, so the compile cache never answers); the gaps
between the streams' chunks are collected in a quiet window before and in the window after the arrival, up to the
heavy requests' first tokens.

    .venv/bin/python bench/intake_stall.py [--root OTHER_CHECKOUT] [--rounds 3]

`--root` runs the launcher of another checkout (e.g. a worktree of an older commit) with this script, so before
and after are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from load import WORDS
from machine import ROOT

STREAMS = 16
STREAM_TOKENS = 400  # long enough to outlast the heavy requests' intake and first tokens
LONG_PROMPT_WORDS = 6000  # one token each (see load.WORDS) plus the template: a ~6,000-token prompt
SCHEMA_PROPERTIES = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def schema(round_: int) -> dict[str, Any]:
    kinds = ({"type": "string", "maxLength": 20}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"})
    names = [f"field_{round_}_{i}" for i in range(SCHEMA_PROPERTIES)]
    return {
        "type": "object",
        "properties": {name: kinds[i % len(kinds)] for i, name in enumerate(names)},
        "required": names,
        "additionalProperties": False,
    }


async def stream(client: httpx.AsyncClient, model: str, topic: int, arrivals: list[float]) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell story number {topic} about {WORDS[topic]}."}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                arrivals.append(time.perf_counter())


async def heavy(client: httpx.AsyncClient, body: dict[str, Any]) -> float:
    """Seconds to the request's first content chunk."""
    started = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and ('"content"' in line or '"error"' in line):
                if '"error"' in line:
                    raise RuntimeError(line)
                return time.perf_counter() - started
    raise RuntimeError(f"no first token: {response.status_code}")


def gaps_within(arrivals: list[list[float]], start: float, end: float) -> list[float]:
    return [b - a for times in arrivals for a, b in zip(times, times[1:], strict=False) if start <= b <= end]


async def one_round(url: str, model: str, round_: int, heavy_kinds: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
        streams = [asyncio.create_task(stream(client, model, i + 20 * round_, arrivals[i])) for i in range(STREAMS)]
        while sum(len(a) >= 20 for a in arrivals) < STREAMS:  # every stream past its prefill: steady decoding
            await asyncio.sleep(0.05)
        quiet_start = time.perf_counter()
        await asyncio.sleep(2.0)
        arrived = time.perf_counter()
        # A different first word each round: the prefix cache must not serve the prompt of an earlier round.
        long_prompt = " ".join(WORDS[(i + 7 * round_) % len(WORDS)] for i in range(LONG_PROMPT_WORDS))
        long_body = {"model": model, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 1}
        schema_body = {
            "model": model,
            "messages": [{"role": "user", "content": "Fill in the form."}],
            "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema(round_)}},
        }
        bodies = {"prompt": [long_body], "schema": [schema_body], "both": [long_body, schema_body]}[heavy_kinds]
        ttfts = await asyncio.gather(*(heavy(client, body) for body in bodies))
        ttft_long = ttfts[0] if heavy_kinds != "schema" else float("nan")
        ttft_schema = ttfts[-1] if heavy_kinds != "prompt" else float("nan")
        done = time.perf_counter()
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    quiet = gaps_within(arrivals, quiet_start, arrived)
    loaded = gaps_within(arrivals, arrived, done)
    return {"quiet": quiet, "loaded": loaded, "ttft_long": ttft_long, "ttft_schema": ttft_schema}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_server(root: Path, port: int, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """The launcher of the checkout at `root` on `port`, ready; its own process group (to stop it whole)."""
    command = [sys.executable, "launcher.py", "--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose launcher to run")
    parser.add_argument("--url", help="measure a server that is already running instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--heavy", choices=("both", "schema", "prompt"), default="both", help="which heavy request(s) arrive"
    )
    parser.add_argument("--flag", action="append", default=[], help="a launcher flag for the server (repeatable)")
    args = parser.parse_args()
    process = None
    url = args.url
    if url is None:
        port = free_port()
        log = Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "server.log"
        process = start_server(args.root.resolve(), port, log, "--worker-arg=--max-running=32", *args.flag)
        url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        results = [asyncio.run(one_round(url, model, r, args.heavy)) for r in range(args.rounds)]
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
    quiet = [g for r in results for g in r["quiet"]]
    loaded = [g for r in results for g in r["loaded"]]
    summary = {
        "root": str(args.root),
        "rounds": args.rounds,
        "heavy": args.heavy,
        "flags": args.flag,
        "quiet_itl_ms": {q: round(1000 * percentile(quiet, p), 1) for q, p in (("p50", 0.5), ("p95", 0.95))},
        "arrival_itl_ms": {q: round(1000 * percentile(loaded, p), 1) for q, p in (("p50", 0.5), ("p95", 0.95))},
        "arrival_itl_max_ms": round(1000 * max(loaded), 1),
        "ttft_long_prompt_s": round(statistics.median(r["ttft_long"] for r in results), 2),
        "ttft_schema_s": round(statistics.median(r["ttft_schema"] for r in results), 2),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
