"""The Ollama dialect: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, as Ollama clients expect them.

Requests and their translation live in `ollama_requests`; this module renders answers and serves the endpoints.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from common.protocol import (
    Delta,
    Done,
    GenerationDefaults,
    Logprob,
    ModelCard,
    ToolCall,
)
from gateway.errors import BadRequest, GatewayError, ModelNotFound, ServerBusy
from gateway.ollama_requests import (
    ChatRequest,
    GenerateRequest,
    chat_decoder,
    generate_decoder,
    show_decoder,
    to_generate,
)
from gateway.request_types import ignored_tools_header
from gateway.streaming import (
    Folded,
    Indexed,
    JSONBody,
    decode_body,
    fold_until_disconnect,
    ndjson,
    open_events,
    stream,
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


def parameter_size(num_parameters: int) -> str:
    """Ollama's format.HumanNumber: 134515008 → "134.52M", 8030261248 → "8.0B"."""
    for scale, suffix, decimals in ((1e9, "B", 1), (1e6, "M", 2)):
        if num_parameters >= scale:
            value = num_parameters / scale
            return f"{value:.0f}{suffix}" if value.is_integer() else f"{value:.{decimals}f}{suffix}"
    if num_parameters >= 1e3:
        return f"{num_parameters / 1e3:.0f}K"
    return str(num_parameters)


def details(card: ModelCard) -> dict[str, Any]:
    family = card.family or card.architecture
    return {
        "parent_model": "",
        "format": card.format,
        "family": family,
        "families": [family] if family else None,
        "parameter_size": parameter_size(card.num_parameters) if card.num_parameters else "",
        "quantization_level": card.quantization or card.dtype.upper(),
    }


def digest(card: ModelCard) -> str:
    """Stable per model and build (Ollama's is the manifest's sha256; there is no manifest here)."""
    identity = f"{card.name}:{card.format}:{card.quantization or card.dtype}:{card.size_bytes}"
    return hashlib.sha256(identity.encode()).hexdigest()


def tag(card: ModelCard, modified_at: str) -> dict[str, Any]:
    return {
        "name": card.name,
        "model": card.name,
        "modified_at": modified_at,
        "size": card.size_bytes,
        "digest": digest(card),
        "details": details(card),
    }


# Ollama shows a model kept loaded forever (keep_alive -1) as expiring in the far future; ours never unload.
NEVER = "2318-01-01T00:00:00Z"


def running(card: ModelCard) -> dict[str, Any]:
    return {
        "name": card.name,
        "model": card.name,
        "size": card.size_bytes,
        "digest": digest(card),
        "details": details(card),
        "expires_at": NEVER,
        "size_vram": card.size_bytes,  # the worker holds the whole model on its device
        "context_length": card.context_length,
    }


def show(card: ModelCard, modified_at: str) -> dict[str, Any]:
    arch = card.architecture or card.family or "unknown"
    return {
        "license": "",
        "modelfile": f"# Modelfile generated by tandem\nFROM {card.name}\n",
        "parameters": parameters(card.defaults),
        "template": card.chat_template,
        "details": details(card),
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": card.num_parameters,
            f"{arch}.context_length": card.context_length,
        },
        "capabilities": card.capabilities or ["completion"],
        "modified_at": modified_at,
    }


# GenerationDefaults fields by the names Ollama's Modelfile PARAMETER gives them.
PARAMETER_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}  # fmt: skip


def parameters(defaults: GenerationDefaults) -> str:
    """The model's defaults as /api/show's `parameters`: Modelfile lines, name padded to 30 as Ollama prints them."""
    values = msgspec.structs.asdict(defaults)
    lines = [f"{PARAMETER_NAMES[k]:<30} {v}" for k, v in values.items() if k in PARAMETER_NAMES and v is not None]
    lines += [f'{"stop":<30} {msgspec.json.encode(stop).decode()}' for stop in defaults.stop]
    return "\n".join(lines)


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


def _loaded(body: ChatRequest | GenerateRequest) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to say: load (or, with keep_alive 0, unload) the model."""
    reason = "unload" if body.keep_alive in (0, "0", "0s", "0m") else "load"
    head = {"model": body.model, "created_at": timestamp()}
    if isinstance(body, ChatRequest):
        return {**head, "message": {"role": "assistant", "content": ""}, "done_reason": reason, "done": True}
    return {**head, "response": "", "done_reason": reason, "done": True}


async def _answer(request: Request, body: ChatRequest | GenerateRequest, started: int) -> Response:
    pool, config = request.app.state.pool, request.app.state.config
    card = pool.find_model(body.model)
    chat = isinstance(body, ChatRequest)
    if not (body.messages if isinstance(body, ChatRequest) else body.prompt):
        return JSONBody(_loaded(body))
    generate = to_generate(body, card, config)
    headers = ignored_tools_header(body.tools if isinstance(body, ChatRequest) else None, generate.tools, card)
    events = open_events(pool, [generate], config.request_timeout)
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


async def tags(request: Request) -> Response:
    modified_at = timestamp(request.app.state.started_at)
    return JSONBody({"models": [tag(card, modified_at) for card in request.app.state.pool.models()]})


async def ps(request: Request) -> Response:
    return JSONBody({"models": [running(card) for card in request.app.state.pool.models()]})


async def show_model(request: Request) -> Response:
    body = await decode_body(request, show_decoder)
    if not (body.model or body.name):
        raise BadRequest("model is required")
    card = request.app.state.pool.find_model(body.model or body.name)
    return JSONBody(show(card, timestamp(request.app.state.started_at)))


def routes() -> list[BaseRoute]:
    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show_model, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]
