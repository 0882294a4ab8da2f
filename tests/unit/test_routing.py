"""Cache-aware routing (gateway/routing.py): the prefix tree's matches, splits and eviction, and the policy's three
decisions — cache affinity, balance when loads drift apart, least loaded for a new prefix."""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq
import zmq.asyncio
from test_ops_harness import ipc_address
from test_pool import HandWorker, until

from common.protocol import ChatMessage, Generate
from gateway.routing import CacheAwareRouter, PrefixTree, RoutingConfig, routing_key
from gateway.workers import WorkerPool

SYSTEM = "You are a helpful assistant. Answer in one short sentence, in plain English, without lists."
SHORT = RoutingConfig(min_match_chars=0)  # the policy on keys a few words long


def chat(*turns: tuple[str, str]) -> Generate:
    return Generate(id=1, model="m", messages=[ChatMessage(role=role, content=text) for role, text in turns])


# -- the tree -----------------------------------------------------------------------------------


def test_each_worker_matches_its_own_longest_prefix() -> None:
    tree = PrefixTree()
    tree.insert("the system prompt. user one", "a")
    tree.insert("the system prompt. user two", "b")
    tree.insert("another thing", "a")
    assert tree.match("the system prompt. user one, again") == {"a": 27, "b": 24}
    assert tree.match("the system prompt. user two") == {"a": 24, "b": 27}
    assert tree.match("the sys") == {"a": 7, "b": 7}
    assert tree.match("another") == {"a": 7}
    assert tree.match("nothing shared") == {}
    assert tree.match("") == {}


def test_sizes_count_each_workers_characters_once_through_splits() -> None:
    tree = PrefixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "a")  # splits "abcdef" at 3: 3 + 3 + 3 characters
    tree.insert("abc", "b")
    assert tree.sizes == {"a": 9, "b": 3}
    tree.insert("abcdef", "a")  # nothing new
    assert tree.sizes["a"] == 9


def test_eviction_forgets_the_least_recently_used_branches_first() -> None:
    tree = PrefixTree()
    tree.insert("shared prefix / old branch", "a")
    tree.insert("shared prefix / new branch", "a")
    tree.insert("shared prefix / old branch", "b")  # b's use must not keep a's copy alive
    tree.insert("shared prefix / new branch", "a")  # a touches the new branch again
    tree.evict("a", max_chars=tree.sizes["a"] - 1)
    assert tree.match("shared prefix / new branch")["a"] == 26
    assert tree.match("shared prefix / old branch") == {"a": 16, "b": 26}
    assert tree.sizes["a"] == 26  # "shared prefix / " + "new branch"


def test_eviction_keeps_the_invariant_and_the_bound_under_random_traffic() -> None:
    """Random prompts over a small alphabet (many shared prefixes, many splits): after each eviction every worker
    is within its bound, its size equals the characters it holds, and a worker on a node is on its parent."""
    rng = random.Random(7)
    tree = PrefixTree()
    for step in range(2000):
        tenant = rng.choice("abc")
        tree.insert("".join(rng.choice("xyz") for _ in range(rng.randint(1, 40))), tenant)
        if step % 50 == 49:
            for t in "abc":
                tree.evict(t, 300)
                assert tree.sizes[t] <= 300
    held: dict[str, int] = {}
    stack = [tree.root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            assert child.tenants, "an empty node was left behind"
            assert node is tree.root or child.tenants.keys() <= node.tenants.keys()
            for t in child.tenants:
                held[t] = held.get(t, 0) + len(child.edge)
            stack.append(child)
    assert held == {t: n for t, n in tree.sizes.items() if n}


def test_removing_a_worker_leaves_the_others_intact() -> None:
    tree = PrefixTree()
    tree.insert("abcdef", "a")
    tree.insert("abcxyz", "b")
    tree.remove("a")
    assert tree.match("abcdef") == {"b": 3}
    assert tree.match("abcxyz") == {"b": 6}
    assert "a" not in tree.sizes


# -- the policy ---------------------------------------------------------------------------------


def test_the_next_turn_of_a_chat_goes_where_its_first_turn_went() -> None:
    router = CacheAwareRouter(RoutingConfig())
    first = routing_key(chat(("system", SYSTEM), ("user", "Tell me about Paris.")))
    chosen, why = router.choose(first, {"a": 0, "b": 0})
    assert why == "load"
    other = "b" if chosen == "a" else "a"
    loads = {chosen: 1, other: 0}  # the worker that holds it is busier, within the balance thresholds
    second = routing_key(
        chat(
            ("system", SYSTEM),
            ("user", "Tell me about Paris."),
            ("assistant", "Paris is the capital of France."),
            ("user", "And its museums?"),
        )
    )
    assert second.startswith(first)
    assert router.choose(second, loads) == (chosen, "cache")


def test_a_new_prefix_goes_to_the_least_loaded_worker() -> None:
    router = CacheAwareRouter(RoutingConfig())
    router.choose("one conversation, a long first message", {"a": 0, "b": 5})
    assert router.choose("another conversation, something else", {"a": 3, "b": 1}) == ("b", "load")


def test_a_short_shared_part_is_not_enough_for_affinity() -> None:
    router = CacheAwareRouter(RoutingConfig(cache_threshold=0.5, min_match_chars=0))
    assert router.choose("same start, then one thing", {"a": 0, "b": 1})[0] == "a"
    # 11 of 30 characters shared: under the threshold, so load decides.
    assert router.choose("same start, and something else", {"a": 2, "b": 1}) == ("b", "load")


def test_a_shared_start_shorter_than_a_kv_block_is_no_affinity() -> None:
    """Two short questions share "<|user|>Wh" — a third of their keys, but less than one KV block of tokens: the
    worker would find nothing of it cached, so load decides."""
    router = CacheAwareRouter(RoutingConfig())
    first = routing_key(chat(("user", "Why is the sky blue?")))
    assert router.choose(first, {"a": 0, "b": 0})[0] == "a"
    assert router.choose(routing_key(chat(("user", "What does a CPU do?"))), {"a": 1, "b": 0}) == ("b", "load")
    assert router.choose(first, {"a": 1, "b": 0}) == ("b", "load")  # even all of it: 28 characters
    without_minimum = CacheAwareRouter(SHORT)
    without_minimum.choose(first, {"a": 0, "b": 0})
    assert without_minimum.choose(first, {"a": 1, "b": 0}) == ("a", "cache")  # what the minimum prevents


def test_unbalanced_loads_override_the_cache() -> None:
    """Both thresholds must be passed: more than `balance_abs` apart, and the max above `balance_rel` × the min."""
    router = CacheAwareRouter(RoutingConfig(balance_abs=4, balance_rel=1.5, min_match_chars=0))
    key = "a long shared conversation prefix that both turns start with"
    assert router.choose(key, {"a": 0, "b": 0})[0] == "a"
    assert router.choose(key + " more", {"a": 4, "b": 0}) == ("a", "cache")  # 4 apart: not above 4
    assert router.choose(key + " again", {"a": 20, "b": 14}) == ("a", "cache")  # 6 apart, but 20 < 14 × 1.5
    assert router.choose(key + " and again", {"a": 5, "b": 0}) == ("b", "balance")


def test_a_worker_that_restarted_loses_its_affinity() -> None:
    router = CacheAwareRouter(RoutingConfig())
    key = "a conversation held by one worker"
    chosen, _ = router.choose(key, {"a": 0, "b": 0})
    router.forget(chosen)
    other = "b" if chosen == "a" else "a"
    assert router.choose(key, {chosen: 1, other: 0}) == (other, "load")


def test_the_tree_stays_within_its_bound_per_worker() -> None:
    router = CacheAwareRouter(RoutingConfig(max_chars=10_000))
    rng = random.Random(1)
    for _ in range(500):
        router.choose("".join(rng.choice("abcdefgh") for _ in range(200)), {"a": 0, "b": 0})
    assert max(router.tree.sizes.values()) <= 10_000


def test_routing_keys_of_raw_prompts_and_tools() -> None:
    assert routing_key(Generate(id=1, model="m", prompt="Once upon a time")) == "Once upon a time"
    with_tools = Generate(id=1, model="m", messages=[ChatMessage(role="user", content="hi")], tools=[{"name": "f"}])
    assert routing_key(with_tools) == '[{"name":"f"}]<|user|>hi'
    long = Generate(id=1, model="m", prompt="x" * 100)
    assert routing_key(long, max_chars=10) == "x" * 10


# -- in the pool --------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["cache_aware", "least_loaded"])
async def test_the_pool_sends_a_chats_next_turn_to_the_same_worker_while_the_first_still_runs(policy: str) -> None:
    """With the first turn still in flight on its worker, least-loaded routing sends the second turn to the idle
    worker, cache-aware routing to the one holding the conversation."""
    context = zmq.asyncio.Context()
    workers = [HandWorker(context, ipc_address()) for _ in range(2)]
    addresses = [str(w.socket.getsockopt_string(zmq.LAST_ENDPOINT)) for w in workers]
    pool = WorkerPool(addresses, context=context, heartbeat_interval=0.05, routing=RoutingConfig(policy=policy))
    await pool.start()
    streams, tasks = [], []
    try:
        await until(lambda: all(w.is_ready for w in pool.workers))
        turns = [("system", SYSTEM), ("user", "What is the capital of France?")]
        for request in (chat(*turns), chat(*turns, ("assistant", "Paris."), ("user", "And of Spain?"))):
            streams.append(pool.generate(request))
            tasks.append(asyncio.create_task(anext(streams[-1])))  # kept waiting: the request stays in flight
            await until(lambda: sum(len(w.generates) for w in workers) == len(streams))
        first = next(w for w in workers if w.generates)
        assert len(first.generates) == (2 if policy == "cache_aware" else 1)
        decisions = {s.labels["decision"] for m in pool.metrics.routing_decisions.collect() for s in m.samples}
        assert ("cache" in decisions) == (policy == "cache_aware")
    finally:
        for task in tasks:
            task.cancel()
        for worker in workers:
            worker.close()
        await pool.close()
