"""Cache-aware routing, after SGLang's router: requests whose prompts share a prefix go to the worker that already
holds that prefix in its KV cache, unless the workers' loads have drifted apart.

The gateway does not tokenize, so the tree is over characters of a routing key (the prompt, or the chat rendered as
plain text: `routing_key`). It is approximate: it records where this gateway sent each prompt, not what the worker
still caches (the worker evicts on its own; other gateways send it prompts too), and it forgets each worker's least
recently used branches past a size bound. A wrong guess costs a cache miss, never a wrong answer.

The decision for one request, over the workers that could take it:
1. loads unbalanced — max − min in flight above `balance_abs` and max above `balance_rel` × min: least loaded;
2. else the longest cached prefix, if it covers more than `cache_threshold` of the key (and `min_match_chars`):
   that worker;
3. else least loaded (ties: the worker whose tree is smallest, so caches fill evenly). SGLang picks the smallest
   tree first; load first suits workers that differ in speed, and new conversations want the idle worker.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from common.protocol import Generate

POLICIES = ("cache_aware", "least_loaded")


@dataclass(frozen=True)
class RoutingConfig:
    policy: str = "cache_aware"  # or "least_loaded"
    cache_threshold: float = 0.3  # share of the key a worker must already hold to win on cache (SGLang's default)
    # … and at least this many characters: the worker caches whole KV blocks of 16 tokens (~64 characters of
    # English), so a shorter shared start (a role marker, "What is") saves nothing there. Not in SGLang.
    min_match_chars: int = 64
    balance_abs: int = 16  # in-flight difference before load wins over cache (SGLang: 64, for GPU-sized batches)
    balance_rel: float = 1.5  # … and max load above this multiple of the min load (SGLang's default)
    max_chars: int = 1_000_000  # characters remembered per worker; past it, its least recently used branches go
    max_key_chars: int = 65_536  # routing looks at the first this many characters of a prompt


def routing_key(request: Generate, max_chars: int = RoutingConfig.max_key_chars) -> str:
    """The text a request's prompt starts with, as far as routing can tell without the chat template: the raw
    prompt, or the tools and every message in order. The next turn of a chat repeats the earlier messages, so its
    key extends the previous turn's key, as its tokens extend the previous prompt's."""
    if request.prompt is not None:
        return request.prompt[:max_chars]
    parts = [msgspec.json.encode(request.tools).decode()] if request.tools else []
    for message in request.messages or []:
        parts.append(f"<|{message.role}|>{message.content}")
        if message.tool_calls:
            parts.append(msgspec.json.encode(message.tool_calls).decode())
        if sum(map(len, parts)) >= max_chars:
            break
    return "".join(parts)[:max_chars]


class _Node:
    __slots__ = ("children", "edge", "parent", "tenants")

    def __init__(self, edge: str, parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, _Node] = {}  # by the first character of the child's edge
        self.tenants: dict[str, int] = {}  # worker → logical time it last used this node


def _common_length(edge: str, text: str, start: int) -> int:
    """How many leading characters of `edge` equal `text[start:]`'s (binary search on C-speed comparisons)."""
    if text.startswith(edge, start):
        return len(edge)
    low, high = 0, min(len(edge), len(text) - start)  # edge[:low] matches; edge[:high + 1] does not
    while low < high:
        middle = (low + high + 1) // 2
        if text.startswith(edge[:middle], start):
            low = middle
        else:
            high = middle - 1
    return low


class PrefixTree:
    """One radix tree over characters shared by all workers (tenants), as SGLang's router keeps it: each node
    records which workers hold its prefix. A worker on a node is on the node's parent too, so a walk down the tree
    finds every worker's longest match at once, and evicting a worker's leaves first keeps that true."""

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.sizes: Counter[str] = Counter()  # characters each worker holds
        self._clock = itertools.count(1)

    def insert(self, text: str, tenant: str) -> None:
        now = next(self._clock)
        node, i = self.root, 0
        node.tenants[tenant] = now
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                child = _Node(text[i:], node)
                node.children[text[i]] = child
            else:
                matched = _common_length(child.edge, text, i)
                if matched < len(child.edge):  # split the edge: the shared part becomes a node of its own
                    middle = _Node(child.edge[:matched], node)
                    middle.tenants = dict(child.tenants)
                    node.children[text[i]] = middle
                    child.edge, child.parent = child.edge[matched:], middle
                    middle.children[child.edge[0]] = child
                    child = middle
            if tenant not in child.tenants:
                self.sizes[tenant] += len(child.edge)
            child.tenants[tenant] = now
            node, i = child, i + len(child.edge)

    def match(self, text: str) -> dict[str, int]:
        """Every worker's longest prefix of `text` in the tree, in characters (absent: none)."""
        matched: dict[str, int] = {}
        node, i = self.root, 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            length = _common_length(child.edge, text, i)
            for tenant in child.tenants:  # deeper nodes hold fewer workers: the last write is the deepest match
                matched[tenant] = i + length
            if length < len(child.edge):
                break
            node, i = child, i + length
        return matched

    def evict(self, tenant: str, max_chars: int) -> None:
        """Forget `tenant`'s least recently used leaves until it holds at most `max_chars` characters."""
        if self.sizes[tenant] <= max_chars:
            return
        serial = itertools.count()  # ties in time: any order, never a comparison of nodes
        leaves = [(node.tenants[tenant], next(serial), node) for node in self._leaves(tenant)]
        heapq.heapify(leaves)
        while leaves and self.sizes[tenant] > max_chars:
            _, _, node = heapq.heappop(leaves)
            parent = self._forget(node, tenant)
            if parent is not None and parent is not self.root and not self._held_below(parent, tenant):
                heapq.heappush(leaves, (parent.tenants[tenant], next(serial), parent))

    def remove(self, tenant: str) -> None:
        """Forget a worker entirely (it left, or restarted with an empty cache)."""
        for node in sorted(self._nodes(tenant), key=self._depth, reverse=True):  # leaves first
            self._forget(node, tenant)
        self.root.tenants.pop(tenant, None)
        self.sizes.pop(tenant, None)

    def _forget(self, node: _Node, tenant: str) -> _Node | None:
        del node.tenants[tenant]
        self.sizes[tenant] -= len(node.edge)
        parent = node.parent
        if not node.tenants and not node.children and parent is not None:
            del parent.children[node.edge[0]]
        return parent

    def _nodes(self, tenant: str) -> list[_Node]:
        found, stack = [], [self.root]
        while stack:
            node = stack.pop()
            for child in node.children.values():
                if tenant in child.tenants:
                    found.append(child)
                    stack.append(child)
        return found

    def _leaves(self, tenant: str) -> list[_Node]:
        return [node for node in self._nodes(tenant) if not self._held_below(node, tenant)]

    @staticmethod
    def _held_below(node: _Node, tenant: str) -> bool:
        return any(tenant in child.tenants for child in node.children.values())

    @staticmethod
    def _depth(node: _Node) -> int:
        depth = 0
        while node.parent is not None:
            node, depth = node.parent, depth + 1
        return depth


class CacheAwareRouter:
    """The policy over a PrefixTree. `choose` decides and remembers the choice; the pool calls `forget` when a
    worker leaves or comes back with an empty cache."""

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.tree = PrefixTree()

    def choose(self, key: str, loads: Mapping[str, int]) -> tuple[str, str]:
        """(worker, why) for a request with routing key `key`; `loads` maps each candidate to its requests in
        flight. Why: "cache" (its prefix is there), "balance" (loads too uneven for cache), "load" (least loaded)."""
        assert loads, "at least one candidate"
        config = self.config
        if len(loads) == 1:
            chosen, why = next(iter(loads)), "load"
        elif self._unbalanced(loads):
            chosen, why = self._least_loaded(loads), "balance"
        else:
            matched = self.tree.match(key)
            best = max(loads, key=lambda w: (matched.get(w, 0), -loads[w]))
            length = matched.get(best, 0)
            if key and length >= config.min_match_chars and length / len(key) > config.cache_threshold:
                chosen, why = best, "cache"
            else:
                chosen, why = self._least_loaded(loads), "load"
        if key:
            self.tree.insert(key, chosen)
            if self.tree.sizes[chosen] > config.max_chars:
                self.tree.evict(chosen, config.max_chars * 9 // 10)  # headroom: the next eviction waits a while
        return chosen, why

    def forget(self, worker: str) -> None:
        self.tree.remove(worker)

    def _unbalanced(self, loads: Mapping[str, int]) -> bool:
        high, low = max(loads.values()), min(loads.values())
        return high - low > self.config.balance_abs and high > low * self.config.balance_rel

    def _least_loaded(self, loads: Mapping[str, int]) -> str:
        return min(loads, key=lambda w: (loads[w], self.tree.sizes.get(w, 0)))
