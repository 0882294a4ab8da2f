"""Prometheus metrics named like vLLM's (`tandem:time_to_first_token_seconds`, …) and the /metrics endpoint.

Several gateway processes (`launcher.py --gateways N`) share one listening socket, so a scrape reaches any
one of them; each must answer for all. We use prometheus-client's multiprocess mode for that rather than a
collector process of our own: every process writes its values to memory-mapped files in one directory
(`PROMETHEUS_MULTIPROC_DIR`, set by the launcher), and /metrics merges the files at scrape time. Counters and
histograms add up over the processes; per-worker gauges come from the worker's heartbeat, which every
process sees, so they keep the most recent value instead of a sum; the gateway's in-flight gauge sums the
live processes. With one process (the default) the values simply live in this app's registry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from common.protocol import Delta, Done, WorkerInfo
from gateway.observe import current_trace

# vLLM's buckets: sub-millisecond on a GPU up to minutes on a busy CPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
               20.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class Metrics:
    """Every metric the gateway exports; one per app, created with it."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry = CollectorRegistry()
        model, worker = ["model_name"], ["worker"]
        self.http_requests = Counter(
            "tandem:http_requests", "HTTP requests by route template, method and status.",
            ["endpoint", "method", "status"], registry=registry,
        )  # fmt: skip
        self.request_success = Counter(
            "tandem:request_success", "Generations that ended, by finish reason (abort: the client left or timed out).",
            ["model_name", "finished_reason"], registry=registry,
        )  # fmt: skip
        self.request_errors = Counter(
            "tandem:request_errors", "Generations that failed, by error code (worker_gone: its worker died).",
            ["model_name", "code"], registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter("tandem:prompt_tokens", "Prompt tokens processed.", model, registry=registry)
        self.generation_tokens = Counter(
            "tandem:generation_tokens", "Tokens generated, aborted generations included.", model, registry=registry
        )
        self.ttft = Histogram(
            "tandem:time_to_first_token_seconds", "From sending the request to the worker to its first delta.",
            model, buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.itl = Histogram(
            "tandem:inter_token_latency_seconds", "Time between generated tokens, as the gateway receives them.",
            model, buckets=ITL_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "tandem:e2e_request_latency_seconds", "From sending the request to the worker to its Done.",
            model, buckets=REQUEST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.queue_time = Histogram(
            "tandem:request_queue_time_seconds", "Time a request waited in the worker before its first step.",
            model, buckets=REQUEST_BUCKETS, registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "tandem:gateway_requests_in_flight", "Generations this gateway is waiting on (all processes).",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.running = self._worker_gauge("tandem:num_requests_running", "Sequences the worker is decoding.")
        self.waiting = self._worker_gauge("tandem:num_requests_waiting", "Requests queued in the worker.")
        self.kv_usage = self._worker_gauge("tandem:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.worker_up = self._worker_gauge("tandem:worker_up", "1 while the worker answers its heartbeat.")
        self.worker_started = self._worker_gauge("tandem:worker_start_time_seconds", "Unix time the worker started.")
        self.prefix_hit_rate = self._worker_gauge(
            "tandem:prefix_cache_hit_rate", "Share of prompt tokens the worker found in its prefix cache (0-1)."
        )
        self.routing_decisions = Counter(
            "tandem:routing_decisions", "Cache-aware routing's choices: cache (prefix held), load (least loaded), "
            "balance (loads too uneven for cache).", ["decision"], registry=registry,
        )  # fmt: skip
        self.worker_restarts = Gauge(
            "tandem:worker_restarts", "Times the worker came back as a new process since this gateway started.",
            worker, registry=registry, multiprocess_mode="max",
        )  # fmt: skip

    def _worker_gauge(self, name: str, documentation: str) -> Gauge:
        # Every gateway process hears the same heartbeats: keep the freshest value, never a sum.
        return Gauge(name, documentation, ["worker"], registry=self.registry, multiprocess_mode="mostrecent")

    # -- what the pool reports ---------------------------------------------------------------

    def worker_info(self, address: str, info: WorkerInfo) -> None:
        self.worker_up.labels(address).set(1)
        self.worker_started.labels(address).set(info.started_at)
        self.running.labels(address).set(info.num_running)
        self.waiting.labels(address).set(info.num_waiting)
        usage = info.kv_blocks_used / info.kv_blocks_total if info.kv_blocks_total else 0.0
        self.kv_usage.labels(address).set(usage)
        self.prefix_hit_rate.labels(address).set(info.prefix_cache_hit_rate)

    def worker_down(self, address: str) -> None:
        for gauge in (self.worker_up, self.running, self.waiting, self.kv_usage):
            gauge.labels(address).set(0)

    def forget_worker(self, address: str) -> None:
        """A discovered worker left for good: its series go, so addresses that come and go (pods rescheduled with
        new IPs) do not pile up. (In multiprocess mode the files keep the last value: 0, from `worker_down`.)"""
        gauges = (self.worker_up, self.running, self.waiting, self.kv_usage, self.prefix_hit_rate, self.worker_started)
        for gauge in (*gauges, self.worker_restarts):
            with contextlib.suppress(KeyError):
                gauge.remove(address)

    def meter(self, model: str) -> Meter:
        return Meter(self, model)

    # -- what /metrics and /stats read -------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        return self._source().collect()

    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self._source()), content_type

    def _source(self) -> CollectorRegistry:
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.multiprocess_dir))
        return merged


class Meter:
    """One generation's clock. The pool feeds it every event; it fills the metrics and the request's Trace."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.trace = current_trace.get()
        self.started = time.perf_counter()
        self.last: float | None = None  # when the latest delta arrived
        self.num_output_tokens = 0
        self.prompt_counted = False
        self.ended = False
        metrics.in_flight.inc()
        if self.trace is not None:
            self.trace.model = model

    def observe(self, event: Delta | Done) -> None:
        now = time.perf_counter()
        if isinstance(event, Done):
            self._count_tokens(event.usage.prompt_tokens, event.usage.completion_tokens)
            self.metrics.e2e.labels(self.model).observe(now - self.started)
            self.metrics.queue_time.labels(self.model).observe(event.timings.queue)
            self._end(event.finish_reason)
            return
        if self.last is None:
            ttft = now - self.started
            self.metrics.ttft.labels(self.model).observe(ttft)
            if self.trace is not None:
                self.trace.ttft = ttft if self.trace.ttft is None else min(self.trace.ttft, ttft)
        new = event.num_output_tokens - self.num_output_tokens
        if self.last is not None and new > 0:
            itl = self.metrics.itl.labels(self.model)
            for _ in range(new):  # a delta can carry several tokens (held back for a stop string)
                itl.observe((now - self.last) / new)
        self.last = now
        self._count_tokens(event.num_prompt_tokens, event.num_output_tokens)

    def fail(self, code: str) -> None:
        self.metrics.request_errors.labels(self.model, code).inc()
        if self.trace is not None:
            self.trace.error = code
        self._end(None)

    def close(self) -> None:
        """Always called last: a generation left before Done or a failure was aborted."""
        if not self.ended:
            self._end("abort")

    def _count_tokens(self, num_prompt: int, num_output: int) -> None:
        # Counted as they stream, so an aborted generation's tokens count too.
        if num_prompt and not self.prompt_counted:
            self.prompt_counted = True
            self.metrics.prompt_tokens.labels(self.model).inc(num_prompt)
            if self.trace is not None:
                self.trace.prompt_tokens += num_prompt
        new = num_output - self.num_output_tokens
        if new > 0:
            self.num_output_tokens = num_output
            self.metrics.generation_tokens.labels(self.model).inc(new)
            if self.trace is not None:
                self.trace.completion_tokens += new

    def _end(self, finish_reason: str | None) -> None:
        self.ended = True
        self.metrics.in_flight.dec()
        if finish_reason is not None:
            self.metrics.request_success.labels(self.model, finish_reason).inc()
            if self.trace is not None:
                self.trace.finish_reason = finish_reason


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    body, content_type = metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})
