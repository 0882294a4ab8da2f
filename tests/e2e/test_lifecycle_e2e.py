"""Lifecycles that must hold: a client gone mid-stream is aborted in the worker; a dead worker fails its
streams at once and is restarted; SIGTERM exits 0."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
LONG = {"messages": STORY, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}  # greedy, and never ends early


def running(server: Server) -> int:
    return sum(w["running"] + w["waiting"] for w in server.health().json()["workers"])


def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll until `predicate` holds; the deadline only catches a hang, so a busy machine does not fail it."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """These tests kill things: they get a tandem of their own."""
    server = start_server(tmp_path_factory.mktemp("lifecycle"))
    yield server
    assert server.stop() == 0, server.log()


def model_of(server: Server) -> str:
    return httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]


def test_disconnect_mid_stream_aborts_then_next_request_works(own_server: Server) -> None:
    model = model_of(own_server)
    body = {"model": model, **LONG, "stream": True}
    for path in ("/v1/chat/completions", "/api/chat"):
        with httpx.stream("POST", own_server.base_url + path, json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            wait_until(lambda: running(own_server) == 1)  # /health's figures ride the 0.5 s heartbeat
        wait_until(lambda: running(own_server) == 0)  # the worker freed the sequence
    response = httpx.post(
        f"{own_server.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 10, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


def test_disconnect_before_the_first_token_aborts(own_server: Server) -> None:
    model = model_of(own_server)
    body = {"model": model, **LONG, "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{own_server.base_url}/v1/chat/completions", json=body, timeout=1.5)
    wait_until(lambda: running(own_server) == 0)


def test_worker_killed_mid_stream_fails_fast_and_is_restarted(own_server: Server) -> None:
    model = model_of(own_server)
    pid = own_server.health().json()["workers"][0]["pid"]
    body = {"model": model, **LONG, "stream": True}
    # The stream must end, with an error event, rather than hang: a read that waits 120 s fails the test.
    with httpx.stream("POST", f"{own_server.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line]
    events = [json.loads(line.removeprefix("data: ")) for line in rest if line != "data: [DONE]"]
    assert "error" in events[-1], rest[-3:]
    wait_until(lambda: own_server.health().status_code == 503)
    ready = own_server.wait_ready()
    assert ready["workers"][0]["pid"] != pid
    response = httpx.post(
        f"{own_server.base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200


def test_sigterm_exits_zero(own_server: Server) -> None:
    assert own_server.stop() == 0
