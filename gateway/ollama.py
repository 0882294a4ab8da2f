"""The Ollama dialect: /api/chat and /api/generate, as Ollama clients expect them.

Requests and their translation live in `ollama_requests`; this module renders answers and serves the endpoints.
The model routes (/api/tags, /api/ps, /api/show, /api/pull…) are in `ollama_models`, embeddings in `embeddings`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from common.protocol import (
    Delta,
    Done,
    Logprob,
    ToolCall,
)
from gateway.errors import BadRequest, GatewayError, ModelNotFound, ServerBusy
from gateway.ollama_requests import (
    ChatRequest,
    GenerateRequest,
    chat_decoder,
    generate_decoder,
    to_generate,
)
from gateway.request_types import ignored_tools_header, keep_alive_seconds
from gateway.streaming import (
    Folded,
    Indexed,
    JSONBody,
    decode_body,
    fold_until_disconnect,
    ndjson,
    open_events,
    stream,
    until_disconnect,
    within,
)

# -- rendering ----------------------------------------------------------------------------------


def timestamp(unix: float | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Go prints Ollama's times: 2024-04-11T16:50:07.123456Z."""
    moment = datetime.now(UTC) if unix is None else datetime.fromtimestamp(unix, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def render_logprobs(items: list[Logprob]) -> list[dict[str, Any]]:
    def one(token: str, logprob: float, raw: list[int] | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, **({"bytes": raw} if raw else {})}

    return [
        {**one(i.token, i.logprob, i.bytes), "top_logprobs": [one(t.token, t.logprob, t.bytes) for t in i.top]}
        for i in items
    ]


def render_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Ollama's shape: no id, arguments as an object (the worker parsed them)."""
    return [{"function": {"name": call.function.name, "arguments": call.function.arguments or {}}} for call in calls]


def chat_chunk(model: str, created_at: str, event: Delta) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.reasoning:
        message["thinking"] = event.reasoning
    if event.tool_calls:
        message["tool_calls"] = render_tool_calls(event.tool_calls)
    chunk = {"model": model, "created_at": created_at, "message": message, "done": False}
    if event.logprobs:
        chunk["logprobs"] = render_logprobs(event.logprobs)
    return chunk


def generate_chunk(model: str, created_at: str, event: Delta) -> dict[str, Any]:
    chunk: dict[str, Any] = {"model": model, "created_at": created_at, "response": event.text}
    if event.reasoning:
        chunk["thinking"] = event.reasoning
    chunk["done"] = False
    if event.logprobs:
        chunk["logprobs"] = render_logprobs(event.logprobs)
    return chunk


def metrics(done: Done, total_ns: int) -> dict[str, Any]:
    """The final line's fields: integer nanoseconds and token counts."""
    timings, usage = done.timings, done.usage
    return {
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "done": True,
        "total_duration": total_ns,
        "load_duration": _ns(timings.load),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": _ns(timings.prefill),
        "eval_count": usage.completion_tokens,
        "eval_duration": _ns(timings.decode),
    }


def chat_final(model: str, created_at: str, done: Done, total_ns: int, answer: Folded | None = None) -> dict[str, Any]:
    """The last line of a stream (`answer` None: empty content), or the whole non-streamed answer."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text if answer else ""}
    if answer and answer.reasoning:
        message["thinking"] = answer.reasoning
    if answer and answer.tool_calls:
        message["tool_calls"] = render_tool_calls(answer.tool_calls)
    final = {"model": model, "created_at": created_at, "message": message, **metrics(done, total_ns)}
    if answer and answer.logprobs:
        final["logprobs"] = render_logprobs(answer.logprobs)
    return final


def generate_final(
    model: str, created_at: str, done: Done, total_ns: int, answer: Folded | None = None
) -> dict[str, Any]:
    final: dict[str, Any] = {"model": model, "created_at": created_at, "response": answer.text if answer else ""}
    if answer and answer.reasoning:
        final["thinking"] = answer.reasoning
    final.update(metrics(done, total_ns))
    if answer and answer.logprobs:
        final["logprobs"] = render_logprobs(answer.logprobs)
    return final


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def error_message(exc: GatewayError) -> str:
    if isinstance(exc, ServerBusy):
        return "server busy, please try again"
    if isinstance(exc, ModelNotFound):
        return f"model '{exc.model}' not found"
    return exc.message


def render_error(exc: GatewayError) -> JSONResponse:
    status = 503 if isinstance(exc, ServerBusy) else exc.status  # Ollama answers 503 when its queue is full
    return JSONResponse({"error": error_message(exc)}, status_code=status, headers=exc.headers)


def _error_line(exc: GatewayError) -> bytes:
    return ndjson({"error": error_message(exc)})


# -- streams and endpoints ----------------------------------------------------------------------


async def _lines(events: AsyncIterator[Indexed], *, model: str, chat: bool, started: int) -> AsyncGenerator[bytes]:
    chunk, final = (chat_chunk, chat_final) if chat else (generate_chunk, generate_final)
    async for _, event in events:
        if isinstance(event, Done):
            yield ndjson(final(model, timestamp(), event, time.perf_counter_ns() - started))
        elif event.text or event.reasoning or event.logprobs or event.tool_calls:
            yield ndjson(chunk(model, timestamp(), event))


async def _load_or_unload(request: Request, body: ChatRequest | GenerateRequest, started: int) -> Response:
    """Ollama's answer to a request with nothing to say: load the model, or with keep_alive 0 unload it."""
    pool, timeout = request.app.state.pool, request.app.state.config.request_timeout
    keep_alive = keep_alive_seconds(body.keep_alive)
    if keep_alive == 0:
        await until_disconnect(request, within(pool.unload(body.model), timeout))
        reason, load_ns = "unload", 0
    else:
        waited = await until_disconnect(request, within(pool.load(body.model, keep_alive), timeout))
        reason, load_ns = "load", _ns(waited)
    head = {"model": body.model, "created_at": timestamp()}
    tail: dict[str, Any] = {"done_reason": reason, "done": True}
    if load_ns:
        tail |= {"total_duration": time.perf_counter_ns() - started, "load_duration": load_ns}
    if isinstance(body, ChatRequest):
        return JSONBody({**head, "message": {"role": "assistant", "content": ""}, **tail})
    return JSONBody({**head, "response": "", **tail})


async def _answer(request: Request, body: ChatRequest | GenerateRequest, started: int) -> Response:
    pool, config = request.app.state.pool, request.app.state.config
    card = pool.find_model(body.model)
    chat = isinstance(body, ChatRequest)
    if "embedding" in card.capabilities:
        raise BadRequest(f'"{body.model}" does not support {"chat" if chat else "generate"}')
    if not (body.messages if isinstance(body, ChatRequest) else body.prompt):
        return await _load_or_unload(request, body, started)
    keep_alive = keep_alive_seconds(body.keep_alive)
    generate = to_generate(body, card, config)
    headers = ignored_tools_header(body.tools if isinstance(body, ChatRequest) else None, generate.tools, card)
    events = open_events(pool, [generate], config.request_timeout, keep_alive)
    if body.stream:
        render = functools.partial(_lines, model=body.model, chat=chat, started=started)
        return await stream(request, events, render, _error_line, media_type="application/x-ndjson", headers=headers)
    [answer] = await fold_until_disconnect(request, events, 1)
    assert answer.done is not None  # the pool ends every stream with Done or an exception
    final = chat_final if chat else generate_final
    answer_body = final(body.model, timestamp(), answer.done, time.perf_counter_ns() - started, answer)
    return JSONBody(answer_body, headers=headers)


async def chat(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await decode_body(request, chat_decoder)
    return await _answer(request, body, started)


async def generate(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await decode_body(request, generate_decoder)
    return await _answer(request, body, started)


async def version(request: Request) -> Response:
    return JSONBody({"version": request.app.state.config.version})


def routes() -> list[BaseRoute]:
    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]
