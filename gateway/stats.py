"""GET /stats: the figures a person wants at a glance, computed from the same metrics Prometheus scrapes.

Reading the metrics (not a second set of counters) keeps /stats true with several gateway processes, and
the two views never disagree. Percentiles are estimated from histogram buckets, as PromQL's
histogram_quantile does, so they are as fine as the buckets.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# Counted when POSTed: `/` is seed 002's chat as a POST, Ollama's probe as a GET.
GENERATION_ENDPOINTS = {
    *("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"),
    *("/api/v1/chat", "/api/v1/chat/stream", "/", "/generate", "/thinking", "/batch_generate", "/chat", "/batch"),
}
LATENCIES = {
    "time_to_first_token": "tandem:time_to_first_token_seconds",
    "inter_token": "tandem:inter_token_latency_seconds",
    "end_to_end": "tandem:e2e_request_latency_seconds",
    "queue": "tandem:request_queue_time_seconds",
}


def summarize(families: Iterable[Metric], uptime: float) -> dict[str, Any]:
    by_name = {family.name: family for family in families}
    by_status: dict[str, float] = defaultdict(float)
    for sample in _samples(by_name, "tandem:http_requests", "_total"):
        if sample.labels.get("endpoint") in GENERATION_ENDPOINTS and sample.labels.get("method") == "POST":
            by_status[sample.labels["status"]] += sample.value
    total = sum(by_status.values())
    succeeded = sum(count for status, count in by_status.items() if status.startswith("2"))
    latencies = {key: _histogram(by_name, name) for key, name in LATENCIES.items()}
    generated = _sum(by_name, "tandem:generation_tokens")
    inter_token = latencies["inter_token"]["mean"]
    return {
        "uptime_s": round(uptime, 3),
        # seed 001's figures, flat: request counts, success rate, mean response time, uptime (seconds)
        "total_requests": int(total),
        "successful_requests": int(succeeded),
        "failed_requests": int(total - succeeded),
        "success_rate": round(succeeded / total, 4) if total else None,
        "average_response_time": latencies["end_to_end"]["mean"],
        "uptime": round(uptime, 3),
        "requests": {
            "total": int(total),
            "succeeded": int(succeeded),
            "failed": int(total - succeeded),
            "success_rate": round(succeeded / total, 4) if total else None,
            "by_status": {status: int(count) for status, count in sorted(by_status.items())},
            "finish_reasons": _by_label(by_name, "tandem:request_success", "finished_reason"),
            "errors": _by_label(by_name, "tandem:request_errors", "code"),
        },
        "latency_s": latencies,
        "tokens": {
            "prompt": int(_sum(by_name, "tandem:prompt_tokens")),
            "generated": int(generated),
            "generated_per_second": round(generated / uptime, 2) if uptime > 0 else None,  # averaged over uptime
            "per_second_per_stream": round(1 / inter_token, 2) if inter_token else None,  # one stream's speed
        },
    }


def _samples(by_name: dict[str, Metric], family: str, suffix: str) -> list[Any]:
    metric = by_name.get(family)
    return [s for s in metric.samples if s.name == family + suffix] if metric else []


def _sum(by_name: dict[str, Metric], family: str) -> float:
    return sum(sample.value for sample in _samples(by_name, family, "_total"))


def _by_label(by_name: dict[str, Metric], family: str, label: str) -> dict[str, int]:
    counts: dict[str, float] = defaultdict(float)
    for sample in _samples(by_name, family, "_total"):
        counts[sample.labels[label]] += sample.value
    return {key: int(value) for key, value in sorted(counts.items()) if value}


def _histogram(by_name: dict[str, Metric], family: str) -> dict[str, Any]:
    """count, mean, p50, p95 over every label set of one histogram."""
    buckets: dict[float, float] = defaultdict(float)  # upper bound → cumulative count, summed over label sets
    for sample in _samples(by_name, family, "_bucket"):
        buckets[float(sample.labels["le"])] += sample.value
    count = sum(s.value for s in _samples(by_name, family, "_count"))
    total = sum(s.value for s in _samples(by_name, family, "_sum"))
    bounds = sorted(buckets.items())
    return {
        "count": int(count),
        "mean": round(total / count, 4) if count else None,
        "p50": quantile(0.5, bounds),
        "p95": quantile(0.95, bounds),
    }


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Like PromQL's histogram_quantile: linear within the bucket the rank falls in. `buckets`: sorted
    (upper bound, cumulative count) pairs ending with +Inf."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(upper):
                return round(lower, 4)  # past the largest finite bound: that bound is all we know
            inside = cumulative - below
            return round(lower + (upper - lower) * ((rank - below) / inside if inside else 1.0), 4)
        lower, below = upper, cumulative
    return round(lower, 4)


async def stats_endpoint(request: Request) -> Response:
    state = request.app.state
    body = summarize(state.metrics.collect(), time.time() - state.started_at)
    workers = state.pool.workers
    body["workers"] = {
        "ready": sum(1 for w in workers if w.is_ready),
        "total": len(workers),
        "running": sum(w.info.num_running for w in workers if w.info),
        "waiting": sum(w.info.num_waiting for w in workers if w.info),
    }
    return JSONResponse(body)
