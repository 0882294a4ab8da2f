"""/metrics and /stats: the exposition parses, moves with traffic, follows the worker's heartbeat, and adds up
over several gateway processes (prometheus-client multiprocess mode)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_ops_harness import MODEL, ScriptedEngine, chat, ipc_address, serve_gateway, serve_worker, tandem, wait_until

from gateway.metrics import Metrics
from gateway.stats import quantile

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_parse_and_move_with_traffic() -> None:
    with tandem() as (gateway, engine):
        base = gateway.base_url
        idle = httpx.get(f"{base}/metrics")
        assert idle.headers["content-type"].startswith("text/plain")
        assert gateway.metric("tandem:generation_tokens_total") == 0
        httpx.post(f"{base}/v1/chat/completions", json=chat())
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat(stream=True, max_tokens=3)) as r:
            r.read()
        httpx.post(f"{base}/api/chat", json=chat(stream=True))
        httpx.post(f"{base}/api/generate", json={"model": MODEL, "prompt": "fail", "raw": True})
        wait_until(lambda: gateway.metric("tandem:http_requests_total", endpoint="/api/generate") == 1)
        # worker gauges come with the next heartbeat (every 0.5 s): wait for the one after the requests
        wait_until(lambda: gateway.metric("tandem:num_requests_running") == 0)
        text = httpx.get(f"{base}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {"tandem:time_to_first_token_seconds", "tandem:num_requests_running", "tandem:worker_up"} <= set(families)

    def value(name: str, **labels: str) -> float:
        family = families[name.removesuffix("_total").removesuffix("_count")]
        return sum(s.value for s in family.samples if s.name == name and labels.items() <= s.labels.items())

    chat_ok = {"endpoint": "/v1/chat/completions", "method": "POST", "status": "200"}
    assert value("tandem:http_requests_total", **chat_ok) == 2
    assert value("tandem:http_requests_total", endpoint="/api/chat", status="200") == 1
    assert value("tandem:http_requests_total", endpoint="/api/generate", status="400") == 1
    assert value("tandem:request_success_total", model_name=MODEL, finished_reason="stop") == 2
    assert value("tandem:request_success_total", finished_reason="length") == 1
    assert value("tandem:request_errors_total", model_name=MODEL, code="bad_request") == 1
    assert value("tandem:prompt_tokens_total", model_name=MODEL) == 9
    assert value("tandem:generation_tokens_total") == 5 + 3 + 5
    assert value("tandem:time_to_first_token_seconds_count") == 3
    assert value("tandem:e2e_request_latency_seconds_count") == 3
    assert value("tandem:request_queue_time_seconds_count") == 3
    assert value("tandem:inter_token_latency_seconds_count") == 4 + 2 + 4  # one per token after the first
    assert value("tandem:gateway_requests_in_flight") == 0
    assert value("tandem:worker_up") == 1 and value("tandem:num_requests_running") == 0
    assert value("tandem:worker_start_time_seconds") == pytest.approx(engine.started_at)


def test_running_gauge_returns_to_zero_after_20_disconnects() -> None:
    engine = ScriptedEngine(num_tokens=100_000, step_s=0.05, max_running=32)
    with tandem(engine) as (gateway, _):
        with contextlib.ExitStack() as stack:
            for i in range(20):
                path = "/v1/chat/completions" if i % 2 else "/api/chat"
                response = stack.enter_context(httpx.stream("POST", gateway.base_url + path, json=chat(stream=True)))
                lines = stack.enter_context(contextlib.closing(response.iter_lines()))
                next(lines)
            wait_until(lambda: gateway.metric("tandem:num_requests_running") == 20)
            assert gateway.metric("tandem:gateway_requests_in_flight") == 20
        # every client hung up
        wait_until(lambda: gateway.metric("tandem:num_requests_running") == 0)
        assert gateway.metric("tandem:num_requests_waiting") == 0
        assert gateway.metric("tandem:gateway_requests_in_flight") == 0
        assert gateway.metric("tandem:request_success_total", finished_reason="abort") == 20
    assert len(engine.aborted) == 20 and not engine.has_work()


def test_worker_up_down_and_restarts() -> None:
    address = ipc_address()
    with serve_gateway(address) as gateway:
        assert gateway.metric("tandem:worker_up", worker=address) == 0  # a series from the start
        with serve_worker(ScriptedEngine(), address):
            wait_until(lambda: gateway.metric("tandem:worker_up", worker=address) == 1)
        wait_until(lambda: gateway.metric("tandem:worker_up", worker=address) == 0)
        assert gateway.metric("tandem:worker_restarts", worker=address) == 0
        with serve_worker(ScriptedEngine(), address):  # the same address, a new instance
            wait_until(lambda: gateway.metric("tandem:worker_up", worker=address) == 1)
            restarts = gateway.metric("tandem:worker_restarts", worker=address)
            health = httpx.get(f"{gateway.base_url}/health").json()
    assert restarts == 1 and health["workers"][0]["restarts"] == 1


def test_stats_for_humans() -> None:
    with tandem() as (gateway, _):
        httpx.post(f"{gateway.base_url}/v1/chat/completions", json=chat())
        httpx.post(f"{gateway.base_url}/api/chat", json=chat(stream=False))
        httpx.post(f"{gateway.base_url}/api/generate", json={"model": MODEL, "prompt": "fail", "raw": True})
        wait_until(lambda: httpx.get(f"{gateway.base_url}/stats").json()["requests"]["total"] == 3)
        # worker figures come with the next heartbeat (every 0.5 s): wait for the one after the requests
        wait_until(lambda: httpx.get(f"{gateway.base_url}/stats").json()["workers"]["running"] == 0)
        stats = httpx.get(f"{gateway.base_url}/stats").json()
    assert stats["requests"] == {
        "total": 3,
        "succeeded": 2,
        "failed": 1,
        "success_rate": 0.6667,
        "by_status": {"200": 2, "400": 1},
        "finish_reasons": {"stop": 2},
        "errors": {"bad_request": 1},
    }
    ttft = stats["latency_s"]["time_to_first_token"]
    assert ttft["count"] == 2 and 0 < ttft["mean"] and 0 < ttft["p50"] <= ttft["p95"]
    assert stats["latency_s"]["inter_token"]["count"] == 8 and stats["latency_s"]["end_to_end"]["count"] == 2
    assert stats["tokens"]["prompt"] == 6 and stats["tokens"]["generated"] == 10
    assert stats["tokens"]["generated_per_second"] > 0 and stats["tokens"]["per_second_per_stream"] > 0
    assert stats["workers"] == {"ready": 1, "total": 1, "running": 0, "waiting": 0}
    assert stats["uptime_s"] > 0


def test_quantile_from_buckets_like_histogram_quantile() -> None:
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert quantile(0.5, buckets) == 0.5
    assert quantile(0.95, buckets) == 0.95
    assert quantile(0.99, [(1.0, 5.0), (float("inf"), 10.0)]) == 1.0  # in +Inf: the largest finite bound
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


ONE_PROCESS = """
import sys
from pathlib import Path
from gateway.metrics import Metrics
from common.protocol import Delta, Done, ModelCard, Usage, WorkerInfo

metrics = Metrics(Path(sys.argv[1]))
meter = metrics.meter("m")
meter.observe(Delta(id=1, text="a", num_prompt_tokens=3, num_output_tokens=1))
meter.observe(Done(id=1, finish_reason="stop", usage=Usage(3, 2)))
metrics.http_requests.labels("/v1/chat/completions", "POST", "200").inc()
info = WorkerInfo("i", 1, [ModelCard("m", 64)], "cpu", 0.0, 1, 1, num_running=int(sys.argv[2]))
metrics.worker_info("tcp://w:5555", info)
sys.stdout.write(metrics.render("")[0].decode())
"""


def test_several_gateway_processes_add_up(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", ONE_PROCESS, str(tmp_path), running], env=env, capture_output=True, check=True
        ).stdout.decode()
        for running in ("2", "5")
    ]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(outputs[-1])
        for s in family.samples
    }
    endpoint = (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200"))
    assert samples[("tandem:http_requests_total", endpoint)] == 2  # counters: summed over the processes
    assert samples[("tandem:generation_tokens_total", (("model_name", "m"),))] == 4
    assert samples[("tandem:time_to_first_token_seconds_count", (("model_name", "m"),))] == 2
    # the same worker's heartbeat, seen by both: the latest value, not a sum
    assert samples[("tandem:num_requests_running", (("worker", "tcp://w:5555"),))] == 5
    assert samples[("tandem:worker_up", (("worker", "tcp://w:5555"),))] == 1


def test_dashboard_and_alerts_use_only_metrics_that_exist() -> None:
    exported = {metric.name for metric in Metrics().registry.collect()}
    used = set()
    for path in (ROOT / "deploy/alerts.yml", ROOT / "deploy/grafana/dashboards/tandem.json"):
        for name in re.findall(r"tandem:[a-z0-9_:]+", path.read_text()):
            used.add(re.sub(r"_(bucket|count|sum|total)$", "", name))
    assert used and used <= exported, used - exported
