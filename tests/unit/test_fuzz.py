"""Property-based fuzzing of every route of both dialects, through the real gateway and the real worker server and
engine (a tiny model behind the real tokenizer, so valid requests finish in milliseconds): random and hostile
bodies never get a 5xx, an error is always in the dialect's shape, and the server still serves afterwards.

A bounded, derandomized run (the same cases every time); bench/fuzz.py runs the long one against the real model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops_harness import Gateway, ipc_address, serve_gateway, serve_worker, wait_until
from tiny_model import tiny_engine

from tests.fuzzing import RAW_BODIES, ROUTES, Route, check_answer, encoded, mutated

EXAMPLES_PER_ROUTE = 45
FUZZ = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    derandomize=True,  # one verdict every run; the long random run is bench/fuzz.py
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def gateway(tokenizer: Any) -> Iterator[Gateway]:
    engine = tiny_engine(tokenizer, max_model_len=64)  # every valid request ends within 64 tokens
    address = ipc_address()
    with serve_worker(engine, address), serve_gateway(address, request_timeout=60) as gateway:  # type: ignore[arg-type]
        gateway.wait_ready()
        yield gateway


def send(gateway: Gateway, route: Route, content: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.request(route.method, gateway.base_url + route.path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.path)
def test_mutated_bodies_get_an_answer_in_the_dialect_shape(gateway: Gateway, route: Route) -> None:
    @FUZZ
    @given(body=mutated(route, "tiny"))
    def one(body: dict[str, Any]) -> None:
        check_answer(route, send(gateway, route, encoded(body)))

    one()


@FUZZ
@given(raw=RAW_BODIES, route=st.sampled_from(ROUTES))
def test_raw_bodies_get_an_answer_in_the_dialect_shape(gateway: Gateway, raw: bytes, route: Route) -> None:
    check_answer(route, send(gateway, route, raw))


def test_the_server_still_serves_and_holds_nothing_afterwards(gateway: Gateway) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True}
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    wait_until(lambda: all(w["running"] == 0 and w["waiting"] == 0 for w in httpx.get(
        f"{gateway.base_url}/health").json()["workers"]))  # fmt: skip
