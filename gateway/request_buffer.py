"""One request's events between the worker connection and the HTTP response: bounded, so a slow reader cannot
grow the gateway's memory without limit.

The worker never waits for a client (one slow reader must not slow the batch), so the gateway holds what a client
has not read yet. The rule: up to `max_events` events are held as they came; past that, a new delta is merged
into the last one held (text appended, counts updated), so a slow reader costs the bytes of its answer, not an
object per token. Past `max_bytes` held for one request, the request is given up: the reader gets a
ClientTooSlow (its stream ends with an error event) and the worker is told to abort it.
"""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec

from common.protocol import Delta, Done, Failed

Event = Delta | Done | Failed

MAX_EVENTS = 64
MAX_BYTES = 4 * 2**20


class WorkerGone(Exception):
    """Put in a request's buffer when its worker died, restarted or stopped answering."""


class ClientTooSlow(Exception):
    """The request's buffer passed its byte limit: its client reads far slower than the model writes."""


class RequestBuffer:
    def __init__(self, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.items: deque[tuple[Event | Exception, int]] = deque()  # (event, bytes of the frames behind it)
        self.num_bytes = 0  # held: what the events cost, near enough
        self.overflowed = False
        self._ready = asyncio.Event()

    def put(self, event: Event | Exception, size: int = 0) -> bool:
        """Hold an event (`size`: its frame's bytes). False once the buffer overflowed: the caller aborts the
        request in the worker; everything after that is dropped."""
        if self.overflowed:
            return False
        last = self.items[-1][0] if self.items else None
        if isinstance(event, Delta) and len(self.items) >= self.max_events and isinstance(last, Delta):
            self.items[-1] = (merge(last, event), self.items[-1][1] + size)
        else:
            self.items.append((event, size))
        self.num_bytes += size
        if self.num_bytes > self.max_bytes:
            self.overflowed = True
            self.items.clear()
            self.num_bytes = 0
            too_slow = ClientTooSlow(f"the client read too slowly: over {self.max_bytes} bytes of answer were waiting")
            self.items.append((too_slow, 0))
        self._ready.set()
        return not self.overflowed

    async def get(self) -> Event | Exception:
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        item, size = self.items.popleft()
        self.num_bytes -= size
        return item

    def __len__(self) -> int:
        return len(self.items)


def merge(first: Delta, second: Delta) -> Delta:
    """Two consecutive deltas of one request as one: as if the worker had sent them in one step."""
    return msgspec.structs.replace(
        second,
        text=first.text + second.text,
        reasoning=first.reasoning + second.reasoning,
        logprobs=[*(first.logprobs or ()), *(second.logprobs or ())] or None,
        tool_calls=[*(first.tool_calls or ()), *(second.tool_calls or ())] or None,
    )
