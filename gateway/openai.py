"""The OpenAI dialect: /v1/chat/completions, /v1/completions and /v1/models, as the official SDK expects them.

Requests and their translation live in `openai_requests`; this module renders answers and serves the endpoints.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from common.protocol import Delta, Done, Logprob, ModelCard, ToolCall
from gateway.errors import BadRequest, GatewayError
from gateway.openai_requests import (
    MAX_CHOICES,
    Sampling,
    chat_decoder,
    completion_decoder,
    for_choices,
    text_to_generate,
    to_generate,
)
from gateway.request_types import ignored_tools_header, keep_alive_seconds
from gateway.streaming import (
    SSE_DONE,
    Folded,
    Indexed,
    JSONBody,
    decode_body,
    fold_until_disconnect,
    open_events,
    sse,
    stream,
)

# -- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What every chunk of one answer repeats."""

    id: str
    created: int
    model: str  # the name the client asked for
    system_fingerprint: str
    include_usage: bool = False  # streams: `usage: null` on every chunk, then a usage chunk


def _head(reply: Reply, object_: str) -> dict[str, Any]:
    return {
        "id": reply.id,
        "object": object_,
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": reply.system_fingerprint,
    }


def chat_chunk(
    reply: Reply, index: int, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    chunk = {**_head(reply, "chat.completion.chunk"), "choices": [choice]}
    if reply.include_usage:
        chunk["usage"] = None
    return chunk


def chat_delta(event: Delta, reasoning_field: bool) -> dict[str, Any]:
    """The text and thinking of one event; its tool calls go out as `tool_call_deltas`."""
    delta: dict[str, Any] = {}
    if event.reasoning:
        delta["reasoning_content"] = event.reasoning
        if reasoning_field:
            delta["reasoning"] = event.reasoning
    if event.text:
        delta["content"] = event.text
    return delta


def tool_call_deltas(calls: list[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """Each call as OpenAI streams one: a header (index, id, type, name), then the arguments string."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls, start=first_index):
        function = {"name": call.function.name, "arguments": ""}
        deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": function}]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments(call)}}]})
    return deltas


def render_tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments(call)}}


def arguments(call: ToolCall) -> str:
    """OpenAI sends arguments as a JSON string; the worker parses them into an object."""
    value = call.function.arguments
    return value if isinstance(value, str) else msgspec.json.encode(value if value is not None else {}).decode()


def chat_logprobs(items: list[Logprob]) -> dict[str, Any]:
    content = [
        {
            "token": item.token,
            "logprob": item.logprob,
            "bytes": item.bytes,
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in item.top],
        }
        for item in items
    ]
    return {"content": content, "refusal": None}


def chat_completion(
    reply: Reply, choices: list[Folded], *, reasoning_field: bool = False, logprobs: bool = False
) -> dict[str, Any]:
    def message(choice: Folded) -> dict[str, Any]:
        # An answer that is only tool calls has content null, as OpenAI sends it.
        out: dict[str, Any] = {"role": "assistant", "content": choice.text or (None if choice.tool_calls else "")}
        if choice.reasoning:
            out["reasoning_content"] = choice.reasoning
            if reasoning_field:
                out["reasoning"] = choice.reasoning
        if choice.tool_calls:
            out["tool_calls"] = [render_tool_call(call) for call in choice.tool_calls]
        return out

    return {
        **_head(reply, "chat.completion"),
        "choices": [
            {
                "index": i,
                "message": message(choice),
                "logprobs": chat_logprobs(choice.logprobs) if logprobs else None,
                "finish_reason": _finish(choice),
            }
            for i, choice in enumerate(choices)
        ],
        "usage": render_usage([choice.done for choice in choices if choice.done], per_prompt=len(choices)),
    }


def text_chunk(
    reply: Reply, index: int, text: str, *, finish_reason: str | None = None, logprobs: Any = None
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    chunk = {**_head(reply, "text_completion"), "choices": [choice]}
    if reply.include_usage:
        chunk["usage"] = None
    return chunk


def text_logprobs(items: list[Logprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; `offset` is where the first token starts in the choice's text."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [item.token for item in items],
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [{t.token: t.logprob for t in item.top} for item in items],
        "text_offset": offsets,
    }


def text_completion(
    reply: Reply, choices: list[Folded], echoed: list[str], *, per_prompt: int = 1, logprobs: bool = False
) -> dict[str, Any]:
    """`echoed[i]` is the text put before choice i (its prompt under `echo`, else "")."""
    return {
        **_head(reply, "text_completion"),
        "choices": [
            {
                "index": i,
                "text": echoed[i] + choice.text,
                "logprobs": text_logprobs(choice.logprobs, len(echoed[i])) if logprobs else None,
                "finish_reason": _finish(choice),
            }
            for i, choice in enumerate(choices)
        ],
        "usage": render_usage([choice.done for choice in choices if choice.done], per_prompt=per_prompt),
    }


def render_usage(dones: list[Done], *, per_prompt: int) -> dict[str, Any]:
    """Choices come in groups of `per_prompt` sharing one prompt, which OpenAI counts once."""
    prompt = sum(done.usage.prompt_tokens for done in dones[:: max(per_prompt, 1)])
    completion = sum(done.usage.completion_tokens for done in dones)
    cached = sum(done.usage.cached_tokens for done in dones[:: max(per_prompt, 1)])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def usage_chunk(reply: Reply, object_: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {**_head(reply, object_), "choices": [], "usage": usage}


def _finish(choice: Folded) -> str:
    return choice.done.finish_reason if choice.done else "stop"


def error_body(exc: GatewayError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def render_error(exc: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


def _error_frame(exc: GatewayError) -> bytes:
    return sse(error_body(exc))  # the SDK raises APIError on a data line with "error"; no [DONE] follows


# -- streams ------------------------------------------------------------------------------------

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _chat_chunks(
    events: AsyncIterator[Indexed], reply: Reply, *, per_prompt: int, reasoning_field: bool, logprobs: bool
) -> AsyncGenerator[bytes]:
    num_calls: dict[int, int] = {}  # tool calls sent so far per choice: the next call's index
    dones: dict[int, Done] = {}
    async for index, event in events:
        if index not in num_calls:
            num_calls[index] = 0
            yield sse(chat_chunk(reply, index, {"role": "assistant", "content": ""}))
        if isinstance(event, Done):
            dones[index] = event
            yield sse(chat_chunk(reply, index, {}, finish_reason=event.finish_reason))
            continue
        delta = chat_delta(event, reasoning_field)
        token_logprobs = chat_logprobs(event.logprobs) if logprobs and event.logprobs else None
        if delta or token_logprobs:
            yield sse(chat_chunk(reply, index, delta, logprobs=token_logprobs))
        for call_delta in tool_call_deltas(event.tool_calls or [], num_calls[index]):
            yield sse(chat_chunk(reply, index, call_delta))
        num_calls[index] += len(event.tool_calls or ())
    if reply.include_usage:
        usage = render_usage([dones[i] for i in sorted(dones)], per_prompt=per_prompt)
        yield sse(usage_chunk(reply, "chat.completion.chunk", usage))
    yield SSE_DONE


async def _text_chunks(
    events: AsyncIterator[Indexed], reply: Reply, echoed: list[str], *, per_prompt: int, logprobs: bool
) -> AsyncGenerator[bytes]:
    offsets: dict[int, int] = {}  # where the next token starts in each choice's text
    dones: dict[int, Done] = {}
    async for index, event in events:
        if index not in offsets:
            offsets[index] = len(echoed[index])
            if echoed[index]:
                yield sse(text_chunk(reply, index, echoed[index]))
        if isinstance(event, Done):
            dones[index] = event
            yield sse(text_chunk(reply, index, "", finish_reason=event.finish_reason))
            continue
        token_logprobs = text_logprobs(event.logprobs, offsets[index]) if logprobs and event.logprobs else None
        offsets[index] += len(event.text)
        if event.text or token_logprobs:
            yield sse(text_chunk(reply, index, event.text, logprobs=token_logprobs))
    if reply.include_usage:
        usage = render_usage([dones[i] for i in sorted(dones)], per_prompt=per_prompt)
        yield sse(usage_chunk(reply, "text_completion", usage))
    yield SSE_DONE


# -- endpoints ----------------------------------------------------------------------------------


def _reply(prefix: str, body: Sampling, card: ModelCard, request: Request) -> Reply:
    version = request.app.state.config.version
    fingerprint = hashlib.sha256(f"{version}:{card.name}".encode()).hexdigest()[:10]
    return Reply(
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        system_fingerprint=f"fp_{fingerprint}",
        include_usage=bool(body.stream and body.stream_options and body.stream_options.include_usage),
    )


def _generative(pool: Any, body: Sampling) -> ModelCard:
    card: ModelCard = pool.find_model(body.model)
    if "embedding" in card.capabilities:
        raise BadRequest(f"The model '{body.model}' is an embedding model: use /v1/embeddings", param="model")
    return card


async def chat_completions(request: Request) -> Response:
    body = await decode_body(request, chat_decoder)
    pool, config = request.app.state.pool, request.app.state.config
    card = _generative(pool, body)
    requests = for_choices(to_generate(body, card, config), body.n or 1)
    headers = ignored_tools_header(body.tools, requests[0].tools, card)
    events = open_events(pool, requests, config.request_timeout, keep_alive_seconds(body.keep_alive))
    reply = _reply("chatcmpl", body, card, request)
    options = {"reasoning_field": config.reasoning_field, "logprobs": bool(body.logprobs)}
    if body.stream:
        render = functools.partial(_chat_chunks, reply=reply, per_prompt=len(requests), **options)
        sse_headers = {**_SSE_HEADERS, **headers}
        return await stream(request, events, render, _error_frame, media_type="text/event-stream", headers=sse_headers)
    choices = await fold_until_disconnect(request, events, len(requests))
    return JSONBody(chat_completion(reply, choices, **options), headers=headers)


async def completions(request: Request) -> Response:
    body = await decode_body(request, completion_decoder)
    pool, config = request.app.state.pool, request.app.state.config
    card = _generative(pool, body)
    prompts, n = [body.prompt] if isinstance(body.prompt, str) else body.prompt, body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise BadRequest(f"At most {MAX_CHOICES} choices per request (prompts × n)", param="n")
    requests = [g for prompt in prompts for g in for_choices(text_to_generate(body, card, prompt, config), n)]
    echoed = [prompt if body.echo else "" for prompt in prompts for _ in range(n)]
    events = open_events(pool, requests, config.request_timeout, keep_alive_seconds(body.keep_alive))
    reply = _reply("cmpl", body, card, request)
    want_logprobs = body.logprobs is not None
    if body.stream:
        render = functools.partial(_text_chunks, reply=reply, echoed=echoed, per_prompt=n, logprobs=want_logprobs)
        return await stream(request, events, render, _error_frame, media_type="text/event-stream", headers=_SSE_HEADERS)
    choices = await fold_until_disconnect(request, events, len(requests))
    return JSONBody(text_completion(reply, choices, echoed, per_prompt=n, logprobs=want_logprobs))


def model_object(card: ModelCard, created: int) -> dict[str, Any]:
    return {
        "id": card.name,
        "object": "model",
        "created": created,
        "owned_by": "tandem",
        "max_model_len": card.context_length,
        "capabilities": card.capabilities or ["completion"],  # tandem's: a chat UI leaves embedding models out
        "parent": card.parent or None,  # vLLM's: a LoRA adapter's base model
    }


async def list_models(request: Request) -> Response:
    created = int(request.app.state.started_at)
    return JSONBody(
        {"object": "list", "data": [model_object(card, created) for card in request.app.state.pool.models()]}
    )


async def get_model(request: Request) -> Response:
    card = request.app.state.pool.find_model(request.path_params["model"])
    return JSONBody(model_object(card, int(request.app.state.started_at)))


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    ]
