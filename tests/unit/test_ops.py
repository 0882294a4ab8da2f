"""Operations without a model: limits, request ids and logs, health, draining on SIGTERM, the ipc socket's mode,
and the launcher giving up. The real gateway and the real WorkerServer, over real sockets."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_ops_harness import MODEL, ScriptedEngine, chat, ipc_address, serve_gateway, serve_worker, tandem, wait_until

import launcher
from common.logs import JSONFormatter
from gateway import __main__ as gateway_main

# -- limits -------------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_in_each_dialect() -> None:
    big = chat(messages=[{"role": "user", "content": "x" * 500}])
    with tandem(max_body_bytes=200) as (gateway, engine):
        openai = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=big)
        ollama = httpx.post(f"{gateway.base_url}/api/chat", json=big)
        chunked = httpx.post(  # no content-length: counted as it streams in
            f"{gateway.base_url}/api/generate", content=iter([b'{"prompt": "', b"x" * 300, b'"}'])
        )
    assert openai.status_code == 413
    assert openai.json()["error"] == {
        "message": "Request body is larger than 200 bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert ollama.status_code == 413 and ollama.json() == {"error": "Request body is larger than 200 bytes"}
    assert chunked.status_code == 413
    assert engine.received == []


@pytest.mark.parametrize(
    ("engine", "config", "message"),
    [
        (ScriptedEngine(num_tokens=10_000, max_running=1, max_waiting=0), {}, "too many requests"),
        (ScriptedEngine(num_tokens=10_000), {"max_in_flight": 1}, "1 requests in flight"),
    ],
    ids=["worker-full", "max-in-flight"],
)
def test_over_capacity_is_429_on_openai_and_503_on_ollama(
    engine: ScriptedEngine, config: dict[str, int], message: str
) -> None:
    with tandem(engine, **config) as (gateway, _):
        with httpx.stream("POST", f"{gateway.base_url}/v1/chat/completions", json=chat(stream=True)) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # this request holds the only slot
            openai = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
            ollama = httpx.post(f"{gateway.base_url}/api/chat", json=chat())
    assert openai.status_code == 429 and openai.headers["retry-after"] == "1"
    assert openai.json()["error"]["type"] == "rate_limit_error" and message in openai.json()["error"]["message"]
    assert ollama.status_code == 503 and ollama.headers["retry-after"] == "1"
    assert ollama.json() == {"error": "server busy, please try again"}
    assert len(engine.received) == 1


def test_request_timeout_is_504_and_aborts_the_work_in_the_worker() -> None:
    engine = ScriptedEngine(num_tokens=10_000)
    with tandem(engine, request_timeout=0.3) as (gateway, _):
        response = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
        wait_until(lambda: len(engine.aborted) == 1 and not engine.has_work())
        with httpx.stream("POST", f"{gateway.base_url}/api/chat", json=chat(stream=True)) as streamed:
            lines = [json.loads(line) for line in streamed.iter_lines() if line]
        wait_until(lambda: len(engine.aborted) == 2 and not engine.has_work())
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert engine.aborted == [request.id for request in engine.received]
    assert lines[-1] == {"error": "The request ran longer than the server's limit of 0.3s and was stopped"}


# -- request ids, logs, health ------------------------------------------------------------------


def test_every_answer_carries_one_request_id_and_echoes_the_clients() -> None:
    with tandem() as (gateway, _):
        base = gateway.base_url
        for path in ("/health", "/health/live", "/metrics", "/stats", "/v1/models", "/api/tags", "/v1/nope", "/nope"):
            assert len(httpx.get(base + path).headers.get_list("x-request-id")) == 1, path
        given = {"x-request-id": "req-42"}
        openai = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=given)
        ollama = httpx.post(f"{base}/api/chat", json=chat(), headers=given)
        fresh = {httpx.get(f"{base}/v1/models").headers["x-request-id"] for _ in range(3)}
    assert openai.headers.get_list("x-request-id") == ["req-42"] and openai.status_code == 200
    assert ollama.headers.get_list("x-request-id") == ["req-42"] and ollama.status_code == 200
    assert len(fresh) == 3


def test_one_info_line_per_request_tells_its_story(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.observe")

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "gateway.observe" and r.levelno == logging.INFO]

    with tandem() as (gateway, _):
        httpx.get(f"{gateway.base_url}/health")  # probes log at DEBUG
        httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat(), headers={"x-request-id": "log-me"})
        httpx.post(f"{gateway.base_url}/api/generate", json={"model": MODEL, "prompt": "fail", "raw": True})
        wait_until(lambda: len(lines()) == 2)
    ok, failed = lines()
    fields, failure = ok.__dict__, failed.__dict__
    assert (fields["request_id"], fields["dialect"], fields["status"]) == ("log-me", "openai", 200)
    assert fields["model"] == MODEL
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["finish_reason"]) == (3, 5, "stop")
    assert 0 < fields["ttft_s"] <= fields["total_s"]
    assert ok.getMessage().startswith("request log-me: POST /v1/chat/completions dialect=openai status=200 model=")
    assert (failure["dialect"], failure["status"], failure["error"]) == ("ollama", 400, "bad_request")
    as_json = json.loads(JSONFormatter().format(ok))
    assert as_json["level"] == "info" and as_json["logger"] == "gateway.observe" and as_json["request_id"] == "log-me"
    assert as_json["message"] == ok.getMessage() and as_json["completion_tokens"] == 5


def test_liveness_and_readiness_per_worker() -> None:
    engine = ScriptedEngine()
    address = ipc_address()
    with serve_gateway(address) as gateway:
        starting = httpx.get(f"{gateway.base_url}/health/ready")
        live = httpx.get(f"{gateway.base_url}/health/live")
        with serve_worker(engine, address):
            gateway.wait_ready()
            ready = httpx.get(f"{gateway.base_url}/health/ready")
    assert starting.status_code == 503 and starting.json()["status"] == "starting"
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert ready.status_code == 200 and ready.json()["status"] == "healthy"  # as seeds 001 and 003 say it
    assert (starting.json()["model_loaded"], starting.json()["model_name"]) == (False, None)
    assert (ready.json()["model_loaded"], ready.json()["model_name"]) == (True, MODEL)
    [worker] = ready.json()["workers"]
    assert worker["address"] == address and worker["ready"] and worker["models"] == [MODEL]
    assert worker["device"] == "cpu" and worker["up_since"] == engine.started_at and worker["uptime_s"] >= 0
    assert (worker["running"], worker["waiting"], worker["restarts"]) == (0, 0, 0)


# -- draining -----------------------------------------------------------------------------------


def test_while_draining_new_requests_get_503_in_their_dialect() -> None:
    with tandem() as (gateway, _):
        gateway.app.state.draining = True  # what SIGTERM sets; the listener stays open in this test
        openai = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
        ollama = httpx.post(f"{gateway.base_url}/api/chat", json=chat())
        health = httpx.get(f"{gateway.base_url}/health")
        live = httpx.get(f"{gateway.base_url}/health/live")
    assert openai.status_code == 503 and openai.json()["error"]["code"] == "service_unavailable"
    assert openai.headers["connection"] == "close" and openai.headers["retry-after"] == "1"
    assert ollama.status_code == 503 and ollama.json() == {"error": "The server is shutting down; retry shortly"}
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert live.status_code == 200 and live.json()["status"] == "draining"


def test_sigterm_lets_an_in_flight_stream_finish() -> None:
    engine = ScriptedEngine(num_tokens=40, step_s=0.02)
    with tandem(engine, shutdown_grace=10) as (gateway, _):
        url = f"{gateway.base_url}/v1/chat/completions"
        with httpx.stream("POST", url, json=chat(stream=True), timeout=10) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            gateway.server.handle_exit(signal.SIGTERM, None)
            try:  # the listener closes within uvicorn's 0.1 s tick; a request that still gets in is told so
                late = httpx.post(url, json=chat(), timeout=5)
                assert late.status_code == 503 and late.json()["error"]["code"] == "service_unavailable"
            except httpx.TransportError:  # refused (listener closed) or reset while still in the backlog
                pass
            rest = [line for line in lines if line]
        gateway.thread.join(10)
        assert not gateway.thread.is_alive()
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in rest[:-1])
    assert text.count("w") == 40
    assert engine.aborted == []


def test_streams_past_the_grace_period_are_aborted_in_the_worker() -> None:
    engine = ScriptedEngine(num_tokens=100_000)
    with tandem(engine, shutdown_grace=1) as (gateway, _):
        with httpx.stream("POST", f"{gateway.base_url}/api/chat", json=chat(stream=True), timeout=10) as response:
            lines = response.iter_lines()
            next(lines)
            gateway.server.handle_exit(signal.SIGTERM, None)
            started = time.monotonic()
            with pytest.raises(httpx.RemoteProtocolError):  # cut mid-body once the grace is over
                for _ in lines:
                    pass
        assert time.monotonic() - started > 0.8  # not before the grace was over
        wait_until(lambda: engine.aborted and not engine.has_work())


# -- the worker's socket and the launcher -------------------------------------------------------


def test_ipc_socket_is_readable_by_its_owner_only() -> None:
    address = ipc_address()
    with serve_worker(ScriptedEngine(), address) as server:
        wait_until(server._outbox_ready.is_set)  # set right after bind and chmod
        mode = stat.S_IMODE(os.stat(address.removeprefix("ipc://")).st_mode)
    assert mode == 0o600


def test_launcher_restarts_a_gateway_with_back_off_then_gives_up_loudly(caplog: pytest.LogCaptureFixture) -> None:
    config = launcher.LaunchConfig(
        host="127.0.0.1",
        port=0,
        models=(),
        device="cpu",
        dtype="auto",
        num_workers=1,
        worker_args=(),
        gateway_args=(),
        grace_period=1,
        max_restarts=2,
    )
    supervisor = launcher.Launcher(config, entries=[])
    crashing = launcher.Child("gateway", [sys.executable, "-c", "raise SystemExit(3)"])
    supervisor.gateways = [crashing]
    crashing.start()
    try:
        assert supervisor._supervise() == 1
    finally:
        supervisor._shutdown()
    assert len(crashing.crashes) == 3
    assert "gateway exited with code 3; restarting in 0.5s" in caplog.text
    assert "gateway exited with code 3; restarting in 1.0s" in caplog.text
    assert "gateway crashed 3 times in 300s (last exit code 3): giving up" in caplog.text


def test_gateway_flags_build_one_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# ops\nsk-1\nsk-2\n")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("TANDEM_API_KEY_FILE", raising=False)
    config, args = gateway_main.parse_args(
        ["--worker=tcp://gpu:5555", "--api-key=sk-0", f"--api-key-file={keys}", "--cors-origins=https://a, https://b"]
        + ["--max-in-flight=8", "--request-timeout=30", "--protect-metrics", "--log-format=json", "--fd=3"]
    )
    assert config.workers == ("tcp://gpu:5555",) and config.api_keys == ("sk-0", "sk-1", "sk-2")
    assert config.cors_origins == ("https://a", "https://b") and config.metrics_dir == tmp_path
    assert (config.max_in_flight, config.request_timeout, config.protect_metrics) == (8, 30.0, True)
    assert (args.fd, args.log_format) == (3, "json")
    with pytest.raises(SystemExit):  # half a CURVE setup is refused before anything starts
        gateway_main.parse_args(["--curve-server-key=server.key"])
    with pytest.raises(SystemExit):
        gateway_main.parse_args([f"--api-key-file={tmp_path / 'missing'}"])
