"""`launcher.py --ray` on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and a second node,
each its own raylet with one CPU): two workers of the default model, one per node, found by the gateway through Ray.

Requests reach both, through the launcher's gateway and through a gateway it runs as a Ray actor. The second node
killed (its raylet and everything on it, SIGKILL): the streams on its worker end with a clean error event, those on
the other run to their end, and new requests succeed there. The node back: Ray restarts the worker on it and the
gateway connects to it again.

About 45 s here (three model loads on two shared cores). The workers keep a small KV cache (64 MiB).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import ray
from ray.cluster_utils import Cluster

from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e

NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}  # the object store's minimum: nothing big goes through it
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def served(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Any]]:
    second = cluster.add_node(**NODE)
    server = start_server(
        tmp_path_factory.mktemp("ray"),
        "--ray",
        cluster.address,
        "--workers",
        "2",
        "--no-embedding-model",
        "--worker-arg=--kv-cache-bytes=67108864",
        "--gateway-arg=--discovery-interval=0.5",
        "--ray-gateway-node",
        cluster.head_node.node_id,
    )
    try:
        ray.init(address=cluster.address, namespace="tandem", log_to_driver=False)
        yield server, second
    finally:
        assert server.stop() == 0, server.log()


def wait_for(what: str, predicate: Callable[[], bool], server: Server, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s\n{server.log()}")
        time.sleep(0.2)


def ready_workers(server: Server) -> list[dict[str, Any]]:
    try:
        return [w for w in server.health().json()["workers"] if w["ready"] and not w["draining"]]
    except (httpx.HTTPError, ValueError):
        return []


def worker_on(node_id: str) -> str:
    """The ZeroMQ address of the worker actor that runs on `node_id`."""
    for name in ray.util.list_named_actors():
        actor = ray.get_actor(name)
        if name.startswith("tandem-worker-") and ray.get(actor.node_id.remote(), timeout=10) == node_id:
            return str(ray.get(actor.address.remote(), timeout=10))
    raise AssertionError(f"no worker actor on node {node_id}")


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, started: asyncio.Event | None) -> str:
    """One streamed chat: "done", or "error: …" when the stream ended with an error event (anything else fails)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}  # fmt: skip
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done"
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return f"error: {event['error']['message']}"
            if started is not None:
                started.set()
    raise AssertionError("the stream ended with neither [DONE] nor an error event")


async def spread(server: Server, prompts: list[str]) -> dict[str, int]:
    """Stream `prompts` at once; once each has its first token, how many each worker has in flight. Long answers,
    so none ends before the count; then the client leaves (the requests are aborted)."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        started = [asyncio.Event() for _ in prompts]
        tasks = [asyncio.create_task(stream(client, p, 1000, s)) for p, s in zip(prompts, started, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
            return {w["address"]: w["in_flight"] for w in server.health().json()["workers"]}
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def complete(server: Server, prompts: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        return await asyncio.gather(*(stream(client, prompt, 8, None) for prompt in prompts))


def test_two_workers_on_two_nodes_serve_survive_a_lost_node_and_take_it_back(
    served: tuple[Server, Any], cluster: Cluster
) -> None:
    server, second = served
    wait_for("both workers ready", lambda: len(ready_workers(server)) == 2, server)
    on_second = worker_on(second.node_id)
    # Distinct conversations (no shared prefix for cache-aware routing to keep together): spread by load.
    prompts = ["Why is the sky blue?", "Name three rivers.", "Write a haiku on rain.", "What does a CPU do?"]

    # A gateway running as a Ray actor on the head node finds both workers too and serves.
    url = ray.get(ray.get_actor("tandem-gateway-0").url.remote(), timeout=10)
    wait_for("the gateway actor sees both", lambda: len(ready_workers(Server(server.process, int(url.rsplit(":", 1)[1]),
             server.log_path))) == 2, server)  # fmt: skip
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 4,
                       "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)  # fmt: skip
    assert reply.status_code == 200, reply.text

    # Both serve.
    assert asyncio.run(complete(server, prompts)) == ["done"] * 4
    loads = asyncio.run(spread(server, prompts))
    assert sorted(loads.values()) == [2, 2], loads

    # The second node dies under load: what ran there fails cleanly, the rest finishes.
    async def lose_the_node() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            started = [asyncio.Event() for _ in prompts]
            tasks = [asyncio.create_task(stream(client, p, 400, s)) for p, s in zip(prompts, started, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 120)
            loads = {w["address"]: w["in_flight"] for w in server.health().json()["workers"]}
            assert loads[on_second] == 2, loads
            await asyncio.to_thread(cluster.remove_node, second, allow_graceful=False)
            return await asyncio.gather(*tasks)

    ends = asyncio.run(lose_the_node())
    assert sorted(e.split(":")[0] for e in ends) == ["done", "done", "error", "error"], ends
    assert all("worker stopped" in e for e in ends if e.startswith("error")), ends
    wait_for("the lost worker dropped", lambda: on_second not in {w["address"] for w in health(server)}, server)
    assert asyncio.run(complete(server, prompts)) == ["done"] * 4
    loads = asyncio.run(spread(server, prompts[:3]))
    assert list(loads.values()) == [3], loads

    # The node comes back: Ray restarts the worker there, the gateway finds it through Ray.
    back = cluster.add_node(**NODE)
    wait_for("a worker on the new node", lambda: len(ready_workers(server)) == 2, server, timeout=180)
    assert worker_on(back.node_id) in {w["address"] for w in ready_workers(server)}
    assert asyncio.run(complete(server, prompts)) == ["done"] * 4
    loads = asyncio.run(spread(server, prompts))
    assert sorted(loads.values()) == [2, 2], loads


def health(server: Server) -> list[dict[str, Any]]:
    return list(server.health().json()["workers"])
