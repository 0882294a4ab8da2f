"""Operations on the real model: API keys on both dialects, metrics that move and add up over two gateway
processes, the running gauge back to 0 after 20 disconnects, and SIGTERM letting a stream finish."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

KEY = "e2e-secret"
AUTH = {"authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Say hi."}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two gateway processes on one port, an API key, room for 24 sequences."""
    server = start_server(
        tmp_path_factory.mktemp("ops"),
        "--gateways=2",
        f"--gateway-arg=--api-key={KEY}",
        "--worker-arg=--max-running=24",
    )
    server.wait_ready(gateways=2)  # both processes up: a request lands on either
    yield server
    assert server.stop() == 0, server.log()


def model_of(server: Server) -> str:
    return httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()["data"][0]["id"]


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


def test_api_key_on_both_dialects(guarded: Server) -> None:
    model = model_of(guarded)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    answer = openai.OpenAI(base_url=f"{guarded.base_url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model, messages=HI, max_tokens=8, temperature=0
    )
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=guarded.base_url).chat(model=model, messages=HI)
    reply = ollama.Client(host=guarded.base_url, headers=AUTH).chat(
        model=model, messages=HI, options={"num_predict": 8, "temperature": 0}
    )
    assert answer.choices[0].message.content and reply.message.content
    assert refused.value.status_code == 401
    assert httpx.get(f"{guarded.base_url}/health").status_code == 200  # open by default


def test_metrics_move_and_add_up_over_two_gateway_processes(guarded: Server) -> None:
    model = model_of(guarded)
    before = scrape(guarded)
    for i in range(6):  # each on a new connection: the two processes share them
        path = "/v1/chat/completions" if i % 2 else "/api/chat"
        body = {
            "model": model,
            "messages": HI,
            "stream": False,
            "max_tokens": 8,
            "temperature": 0,  # greedy: every answer has at least one token
            "options": {"num_predict": 8, "temperature": 0},
        }
        assert httpx.post(guarded.base_url + path, json=body, headers=AUTH, timeout=60).status_code == 200
    after = scrape(guarded)  # any process answers, for both

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("tandem:http_requests_total", endpoint="/v1/chat/completions", status="200") == 3
    assert moved("tandem:http_requests_total", endpoint="/api/chat", status="200") == 3
    assert moved("tandem:time_to_first_token_seconds_count") == 6
    assert moved("tandem:e2e_request_latency_seconds_count") == 6
    assert moved("tandem:request_success_total", model_name=model) == 6
    assert moved("tandem:prompt_tokens_total") > 6 * 5 and 6 <= moved("tandem:generation_tokens_total") <= 6 * 8
    assert total(after, "tandem:worker_up") == 1
    stats = httpx.get(f"{guarded.base_url}/stats").json()
    assert stats["requests"]["total"] >= 6 and stats["latency_s"]["time_to_first_token"]["p95"] > 0
    pids = {line.split("[")[1].split("]")[0] for line in guarded.log().splitlines() if "Started server process" in line}
    assert len(pids) == 2, guarded.log()


def test_running_gauge_returns_to_zero_after_20_disconnects(guarded: Server) -> None:
    model = model_of(guarded)
    before = scrape(guarded)
    body = {"model": model, "messages": STORY, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    url = f"{guarded.base_url}/v1/chat/completions"  # ignore_eos: none of them can end on its own
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            response = stack.enter_context(httpx.stream("POST", url, json=body, headers=AUTH, timeout=60))
            lines = stack.enter_context(contextlib.closing(response.iter_lines()))
            next(lines)
        busy = scrape(guarded)
        assert total(busy, "tandem:num_requests_running") + total(busy, "tandem:num_requests_waiting") > 0
    deadline = time.monotonic() + 30
    while True:  # the heartbeat brings the worker's counts every 0.5 s
        after = scrape(guarded)
        if total(after, "tandem:num_requests_running") == 0 and total(after, "tandem:num_requests_waiting") == 0:
            break
        assert time.monotonic() < deadline, "the running gauge did not return to 0"
        time.sleep(0.2)
    aborted = total(after, "tandem:request_success_total", finished_reason="abort")
    assert aborted - total(before, "tandem:request_success_total", finished_reason="abort") == 20
    assert total(after, "tandem:gateway_requests_in_flight") == 0


def wait_draining(server: Server, timeout: float = 120.0) -> None:
    """Until /health says the gateway drains (503) or its listener is closed; the deadline only catches a hang."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.base_url}/health", timeout=10).status_code == 503:
                return
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, "the gateway never began draining after SIGTERM"
        time.sleep(0.05)  # the poll's pace, not a wait for the event


def test_sigterm_mid_stream_lets_the_stream_finish(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A long grace: on a busy CPU 32 tokens can take a while; what matters is that they all arrive.
    server = start_server(tmp_path_factory.mktemp("sigterm"), "--log-format=json", "--grace-period=120")
    try:
        model = model_of(server)
        body = {"model": model, "messages": STORY, "max_tokens": 32, "stream": True, "ignore_eos": True}
        url = f"{server.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers={"x-request-id": "drain-me"}, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            server.process.send_signal(signal.SIGTERM)
            wait_draining(server)
            try:  # the gateway has closed its listener, or tells a late request it is draining
                late_body = {"model": model, "messages": HI, "max_tokens": 4, "temperature": 0}
                late = httpx.post(url, json=late_body, timeout=10)
                assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable"
            except httpx.TransportError:
                pass
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
        assert not any("error" in chunk for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(150) == 0
    finally:
        code = server.stop()
    assert code == 0, server.log()
    records = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    [line] = [r for r in records if r.get("request_id") == "drain-me"]
    assert (line["dialect"], line["model"], line["status"], line["completion_tokens"]) == ("openai", model, 200, 32)
    assert line["prompt_tokens"] > 0 and 0 < line["ttft_s"] < line["total_s"] and line["level"] == "info"
    assert any("draining" in r["message"] for r in records)
