"""How fast does every client get a clean end when a process dies or freezes under load? The timings behind the
README's Reliability table (tests/e2e/test_chaos_e2e.py asserts the ends themselves, not their speed).

1. The worker is SIGKILLed under 32 streams: seconds from the kill to each client's error event; the service back.
2. The worker is SIGSTOPped for 5 s under 8 streams: how each ended; seconds from SIGCONT until it runs nothing.
3. The gateway is SIGKILLed with 8 streams open: seconds until the worker has aborted them (seen through the
   gateway the launcher starts in its place).

    .venv/bin/python bench/chaos.py [--root OTHER_CHECKOUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from intake_stall import free_port, start_server
from machine import ROOT

STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


async def stream(client: httpx.AsyncClient, body: dict[str, Any], ready: asyncio.Event) -> tuple[str, float]:
    """(how it ended: done, error or cut; when, perf_counter)."""
    end = "cut"
    chunks = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    end = "done"
                elif line.startswith("data: "):
                    if '"error"' in line:
                        end = "error"
                    chunks += 1
                    if chunks >= 2:
                        ready.set()
    except httpx.TransportError:
        pass
    return end, time.perf_counter()


async def under_load(url: str, count: int, act: Callable[[], float]) -> tuple[float, list[tuple[str, float]]]:
    """`count` streams; once each has its first tokens, `act()` (returns when it acted); every stream's end."""
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": STORY, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        ready = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(stream(client, body, event)) for event in ready]
        await asyncio.gather(*(event.wait() for event in ready))
        acted = await asyncio.to_thread(act)
        return acted, await asyncio.gather(*tasks)


def worker(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/health", timeout=5).json()["workers"][0])


def wait_for(predicate: Callable[[], bool]) -> float:
    """perf_counter when `predicate` first holds (polled every 20 ms)."""
    while True:
        try:
            if predicate():
                return time.perf_counter()
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.02)


def kill_worker(url: str) -> dict[str, Any]:
    pid = worker(url)["pid"]

    def act() -> float:
        os.kill(pid, signal.SIGKILL)
        return time.perf_counter()

    killed, ends = asyncio.run(under_load(url, 32, act))
    back = wait_for(lambda: worker(url)["ready"] and worker(url)["pid"] != pid)
    latencies = [end - killed for _, end in ends]
    return {
        "ends": {kind: sum(1 for k, _ in ends if k == kind) for kind in ("done", "error", "cut")},
        "to_error_s": {"p50": round(statistics.median(latencies), 3), "max": round(max(latencies), 3)},
        "worker_back_s": round(back - killed, 1),
    }


def freeze_worker(url: str) -> dict[str, Any]:
    pid = worker(url)["pid"]

    def act() -> float:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(pid, signal.SIGCONT)
        return time.perf_counter()

    resumed, ends = asyncio.run(under_load(url, 8, act))
    idle = wait_for(lambda: worker(url)["ready"] and worker(url)["running"] == 0 and worker(url)["waiting"] == 0)
    return {
        "ends": {kind: sum(1 for k, _ in ends if k == kind) for kind in ("done", "error", "cut")},
        "running_0_after_sigcont_s": round(idle - resumed, 2),
    }


def kill_gateway(url: str) -> dict[str, Any]:
    pid = httpx.get(f"{url}/health").json()["gateway_pid"]

    def act() -> float:
        os.kill(pid, signal.SIGKILL)
        return time.perf_counter()

    killed, ends = asyncio.run(under_load(url, 8, act))
    idle = wait_for(
        lambda: httpx.get(f"{url}/health", timeout=2).json()["gateway_pid"] != pid
        and worker(url)["running"] == 0
        and worker(url)["waiting"] == 0
    )
    return {
        "ends": {kind: sum(1 for k, _ in ends if k == kind) for kind in ("done", "error", "cut")},
        "worker_running_0_s": round(idle - killed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose launcher to run")
    args = parser.parse_args()
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "server.log"
    process = start_server(args.root.resolve(), port, log, "--worker-arg=--max-running=32")
    url = f"http://127.0.0.1:{port}"
    try:
        results = {
            "worker SIGKILL, 32 streams": kill_worker(url),
            "worker SIGSTOP 5 s, 8 streams": freeze_worker(url),
            "gateway SIGKILL, 8 streams": kill_gateway(url),
        }
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
