"""What both dialects share: reading the JSON body, running generations until done or the client leaves, framing.

Every path that stops early — client gone, timeout, a failure in a sibling choice — ends in the pool's
generator being closed or cancelled, which sends Abort to the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from common.protocol import Delta, Done, Generate, Logprob, ToolCall
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    GatewayError,
    InternalError,
    PayloadTooLarge,
    RequestTimeout,
)
from gateway.observe import current_trace

logger = logging.getLogger(__name__)

T = TypeVar("T")
Event = Delta | Done
Indexed = tuple[int, Event]  # (choice index, event): OpenAI's `n` runs one Generate per choice


class EventSource(Protocol):
    """The one method of WorkerPool these helpers use (a fake pool in tests has it too)."""

    def generate(self, request: Generate, keep_alive: float | None = None) -> AsyncIterator[Event]: ...


# -- the request body ---------------------------------------------------------------------------

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")


async def decode_body(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    """Read at most config.max_body_bytes and decode; a bad body is a 400 whose message names the field."""
    limit: int = request.app.state.config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return decoder.decode(b"".join(chunks))
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc), param=_param_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # msgspec checks UTF-8 inside strings only as it builds them
        raise BadRequest(f"Request body is not valid UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:  # found by tests/unit/test_fuzz.py: {"a":{"a":… 20,000 deep
        raise BadRequest("Request body is nested too deeply") from None


def _param_of(message: str) -> str | None:
    path = _PATH.search(message)
    prefix = path.group(1) if path else ""
    missing = _MISSING.search(message)
    if missing:
        return f"{prefix}.{missing.group(1)}" if prefix else missing.group(1)
    return prefix or None


# -- running generations ------------------------------------------------------------------------


def open_events(
    pool: EventSource, requests: list[Generate], timeout: float | None, keep_alive: float | None = None
) -> AsyncGenerator[Indexed]:
    """One stream of (choice index, event) over every request, interleaved as the events arrive. The timeout
    covers the whole request, a wait for its model to load included."""
    return _merge([pool.generate(request, keep_alive) for request in requests], timeout)


async def _merge(streams: list[AsyncIterator[Event]], timeout: float | None) -> AsyncGenerator[Indexed]:
    # One task per stream waits for its next event; the next wait starts before the event is handed on,
    # so at any moment each unfinished stream has exactly one task, and cleanup is "cancel them all".
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    pending = {asyncio.create_task(_next(stream)): index for index, stream in enumerate(streams)}
    try:
        while pending:
            remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
            done, _ = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise RequestTimeout(f"The request ran longer than the server's limit of {timeout:g}s and was stopped")
            ready = sorted(((pending.pop(task), task) for task in done), key=lambda item: item[0])
            failures = [exc for _, task in ready if (exc := task.exception()) is not None]
            if failures:
                raise failures[0]  # a GatewayError in one choice ends them all
            for index, task in ready:
                event = task.result()
                if event is None:
                    continue
                if not isinstance(event, Done):
                    pending[asyncio.create_task(_next(streams[index]))] = index
                yield index, event
    finally:
        # Shielded: Starlette cancels a streaming body's task on disconnect, and keeps cancelling each await
        # inside its cancel scope; the Abort must still go out.
        await asyncio.shield(asyncio.ensure_future(_close(list(pending), streams)))


async def _next(stream: AsyncIterator[Event]) -> Event | None:
    try:
        return await anext(stream)
    except StopAsyncIteration:  # a stream that ends without Done; the pool never does
        return None


async def _close(tasks: list[asyncio.Task[Event | None]], streams: list[AsyncIterator[Event]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:  # a stream left waiting at its yield runs its finally (Abort) now
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()


async def within(work: Awaitable[T], timeout: float | None) -> T:
    """`work` bounded by the request timeout (a load's wait: the load itself goes on for whoever else waits)."""
    try:
        return await asyncio.wait_for(work, timeout)
    except TimeoutError:
        message = f"The request ran longer than the server's limit of {timeout:g}s and was stopped"
        raise RequestTimeout(message) from None


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` while watching the connection; if the client leaves first, cancel it (→ Abort)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            logger.warning("watching for disconnect failed: %r", watcher.exception())
        if not task.done():
            task.cancel()
            await asyncio.wait((task,))  # let its cleanup (Abort) finish before the response goes out
    if task.cancelled():
        logger.info("client disconnected before the answer was ready; request aborted")
        raise ClientDisconnected("Client disconnected")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass
class Folded:
    """One choice's whole answer, folded from its deltas."""

    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    done: Done | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)


async def fold(events: AsyncIterator[Indexed], num_choices: int) -> list[Folded]:
    choices = [Folded() for _ in range(num_choices)]
    async for index, event in events:
        choice = choices[index]
        if isinstance(event, Done):
            choice.done = event
            continue
        choice.parts.append(event.text)
        choice.reasoning_parts.append(event.reasoning)
        choice.logprobs.extend(event.logprobs or ())
        choice.tool_calls.extend(event.tool_calls or ())
    return choices


async def fold_until_disconnect(request: Request, events: AsyncIterator[Indexed], num_choices: int) -> list[Folded]:
    return await until_disconnect(request, fold(events, num_choices))


# -- framing ------------------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def ndjson(payload: Any) -> bytes:
    return msgspec.json.encode(payload) + b"\n"


class JSONBody(Response):
    """A JSON response encoded by msgspec (Starlette's JSONResponse goes through the json module)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


class EventStream(StreamingResponse):
    """A streamed body that always closes its iterator, so an early exit aborts the requests behind it."""

    def __init__(self, body: AsyncGenerator[bytes], *, media_type: str, headers: dict[str, str]) -> None:
        super().__init__(body, media_type=media_type, headers=headers)
        self.chunks = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.chunks.aclose()


async def stream(
    request: Request,
    events: AsyncGenerator[Indexed],
    render: Callable[[AsyncIterator[Indexed]], AsyncGenerator[bytes]],
    error_frame: Callable[[GatewayError], bytes],
    *,
    media_type: str,
    headers: dict[str, str] | None = None,
) -> EventStream:
    """Wait for the first event before answering, so a failure up to then gets its own HTTP status;
    a failure after it becomes one `error_frame` at the end of the stream."""
    first = await until_disconnect(request, _first(events))
    source = _prepend(first, events)
    return EventStream(_guarded(render(source), source, error_frame), media_type=media_type, headers=headers or {})


async def _first(events: AsyncIterator[Indexed]) -> Indexed:
    return await anext(events)


async def _prepend(first: Indexed, events: AsyncGenerator[Indexed]) -> AsyncGenerator[Indexed]:
    async with contextlib.aclosing(events):
        yield first
        async for item in events:
            yield item


async def _guarded(
    chunks: AsyncGenerator[bytes], source: AsyncGenerator[Indexed], error_frame: Callable[[GatewayError], bytes]
) -> AsyncGenerator[bytes]:
    # Closes `source` itself: a renderer left at a yield does not close what it was iterating.
    async with contextlib.aclosing(source), contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except GatewayError as exc:
            logger.warning("stream ended by an error: %s", exc.message)
            yield error_frame(exc)
        except Exception as exc:  # a bug: the client still gets an error event, never a stream cut without a word
            logger.exception("stream ended by an unexpected error")
            yield error_frame(internal_error(exc))


def internal_error(exc: BaseException, request_id: str | None = None) -> InternalError:
    """What a client is told of a bug: that it happened, and the request id to find it in the logs."""
    trace = current_trace.get()
    request_id = request_id or (trace.request_id if trace is not None else None)
    where = f" (request id {request_id})" if request_id else ""
    return InternalError(f"Internal server error{where}: {type(exc).__name__}")
