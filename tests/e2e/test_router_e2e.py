"""Two real tandem servers behind a real sglang-router (the Rust router from PyPI): the router learns the real
model name from /server_info and /model_info, proxies OpenAI chat (streamed and not) to both servers, and does
not carry the Ollama routes (README, "Behind a router")."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ROOT, Server, free_port, start_server

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Say hi."}]


@dataclass
class Fleet:
    router: str  # base URL
    servers: list[Server]


def start_router(workers: list[Server], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [
        sys.executable, "-m", "sglang_router.launch_router",
        "--worker-urls", *(server.base_url for server in workers),
        "--host", "127.0.0.1", "--port", str(port),
        "--policy", "round_robin",  # so "both servers get traffic" follows from the policy, not from luck
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),  # its default, 29000, may be taken
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_for_workers(process: subprocess.Popen[bytes], url: str, log_path: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sglang-router exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readiness", timeout=2).json().get("healthy_workers") == count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"sglang-router never saw {count} healthy workers:\n{log_path.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("router")
    with ThreadPoolExecutor(2) as pool:  # both servers load the model at once
        servers = list(pool.map(lambda _: start_server(logs), range(2)))
    router, url = start_router(servers, logs / "router.log")
    try:
        wait_for_workers(router, url, logs / "router.log", count=2)
        yield Fleet(url, servers)
    finally:
        router.terminate()
        router.wait(30)
        for server in servers:
            assert server.stop() == 0, server.log()


def chat_requests(server: Server) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tandem:http_requests_total" and sample.labels["endpoint"] == "/v1/chat/completions"
    )


def test_the_router_lists_the_real_model_name(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.router}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == [MODEL]
    assert httpx.get(f"{fleet.router}/get_model_info").json()["model_path"] == MODEL  # passed to a server


def test_chat_through_the_router_reaches_both_servers(fleet: Fleet) -> None:
    before = [chat_requests(server) for server in fleet.servers]
    client = openai.OpenAI(base_url=f"{fleet.router}/v1", api_key="unused", max_retries=0)
    for _ in range(2):
        answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content and answer.model == MODEL
        stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    moved = [chat_requests(server) - start for server, start in zip(fleet.servers, before, strict=True)]
    assert sum(moved) == 4  # every request reached exactly one server, none was retried
    assert all(count > 0 for count in moved), moved


def test_the_router_does_not_carry_the_ollama_routes(fleet: Fleet) -> None:
    """If a later router passes them, README's "Behind a router" needs updating."""
    body = {"model": MODEL, "messages": HI, "stream": False}
    assert httpx.post(f"{fleet.router}/api/chat", json=body).status_code == 404
    assert httpx.post(f"{fleet.servers[0].base_url}/api/chat", json=body | {"options": {"num_predict": 4}}).is_success
