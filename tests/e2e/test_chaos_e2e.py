"""Chaos on the real model: processes killed or frozen under load. Every client gets a clean end (its answer, or
one error event), the service comes back, and the worker is left running nothing nobody waits for.

How fast each clean end comes is measured by bench/chaos.py (README, Reliability), not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


@dataclass
class Outcome:
    end: str  # "done" ([DONE] after a finish reason), "error" (one error event), "cut" (the connection died)
    chunks: int  # content chunks received
    completion_tokens: int | None = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Its own tandem: these tests kill and freeze its processes."""
    server = start_server(tmp_path_factory.mktemp("chaos"), "--worker-arg=--max-running=32")
    yield server
    assert server.stop() == 0, server.log()


def model_of(server: Server) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]


def workers(server: Server) -> list[dict]:
    return server.health().json()["workers"]


def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


async def stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event) -> Outcome:
    outcome = Outcome("cut", 0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    outcome.end = "done"
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        outcome.end = "error"
                        continue
                    outcome.chunks += any(c["delta"].get("content") for c in chunk["choices"])
                    if chunk.get("usage"):
                        outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                    if outcome.chunks >= 2:
                        started.set()
    except httpx.TransportError:
        pass  # "cut": the server's end of the connection went away
    return outcome


async def run_streams(server: Server, count: int, max_tokens: int, act) -> list[Outcome]:  # type: ignore[no-untyped-def]
    """`count` streams; once each has its first tokens, `act()` runs (in a thread); every stream's end."""
    body = {
        "model": model_of(server),
        "messages": STORY,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=count + 4)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
        started = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(stream(client, body, event)) for event in started]
        async with asyncio.timeout(300):
            await asyncio.gather(*(event.wait() for event in started))
        await asyncio.to_thread(act)
        async with asyncio.timeout(120):  # the guard against a hang: no stream may outlive it
            return await asyncio.gather(*tasks)


def test_worker_killed_under_32_streams_every_client_gets_a_clean_error(server: Server) -> None:
    pid = workers(server)[0]["pid"]
    outcomes = asyncio.run(run_streams(server, 32, 2000, lambda: os.kill(pid, signal.SIGKILL)))
    assert [o.end for o in outcomes] == ["error"] * 32, outcomes
    wait_until(lambda: workers(server)[0]["ready"] and workers(server)[0]["pid"] != pid)
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": model_of(server), "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200


def test_worker_frozen_for_5s_every_request_ends_cleanly_and_nothing_is_left_running(server: Server) -> None:
    def freeze() -> None:
        pid = workers(server)[0]["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(5)
        finally:
            os.kill(pid, signal.SIGCONT)

    outcomes = asyncio.run(run_streams(server, 8, 300, freeze))
    assert all(o.end in ("done", "error") for o in outcomes), outcomes
    for outcome in outcomes:  # nothing a client was told succeeded is short of what it asked for
        assert outcome.end != "done" or outcome.completion_tokens == 300, outcome
    wait_until(lambda: workers(server)[0]["ready"] and workers(server)[0]["running"] == 0, timeout=30)
    assert workers(server)[0]["waiting"] == 0


def test_gateway_killed_with_streams_open_the_worker_aborts_them(server: Server) -> None:
    killed = server.health().json()["gateway_pid"]
    outcomes = asyncio.run(run_streams(server, 8, 2000, lambda: os.kill(killed, signal.SIGKILL)))
    assert [o.end for o in outcomes] == ["cut"] * 8, outcomes
    # The launcher starts a new gateway; through it, the worker is seen running nothing: no orphaned KV.
    wait_until(lambda: server.health().json()["gateway_pid"] != killed)
    wait_until(lambda: workers(server)[0]["running"] == 0 and workers(server)[0]["waiting"] == 0, timeout=30)
    assert workers(server)[0]["kv_cache_usage"] == 0
