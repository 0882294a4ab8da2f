"""The Ollama dialect: /api/chat, /api/generate, /api/tags, /api/ps, /api/show, as Ollama clients expect them."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import BadRequest, GatewayError, ModelNotFound, ServerBusy
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
from worker.protocol import (
    ChatMessage,
    Delta,
    Done,
    Generate,
    Logprob,
    ModelCard,
    Penalty,
    Probability,
    SamplingParams,
    Temperature,
    ToolCall,
    ToolCallFunction,
)

# -- requests: unknown fields (and options such as num_ctx, repeat_last_n, mirostat) are ignored -------


class Options(Struct, kw_only=True):
    # Ollama's sampler defaults. repeat_penalty stays off: Ollama's 1.1 applies to the last 64 tokens only,
    # the worker's penalty to the whole sequence.
    temperature: Temperature = 0.8
    top_p: Probability = 0.9
    top_k: int = 40  # <= 0: off
    min_p: Probability = 0.0
    num_predict: int | None = None  # -1: unlimited, -2: fill the context; both "up to the context" here
    seed: int | None = None  # < 0: random, as Ollama's -1
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None  # <= 0: off
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0


class FunctionCall(Struct):
    name: str
    arguments: dict[str, Any] = {}


class MessageToolCall(Struct):
    function: FunctionCall
    id: str | None = None


class Message(Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    thinking: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_name: str | None = None


Think = bool | Literal["low", "medium", "high"]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]


class Common(Struct, kw_only=True):
    model: str
    stream: bool = True  # Ollama streams unless told not to
    format: Any = None
    options: Options | None = None
    think: Think | None = None
    keep_alive: Any = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None


class ChatRequest(Common, kw_only=True):
    messages: list[Message] = []
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(Common, kw_only=True):
    prompt: str = ""
    system: str = ""
    raw: bool = False
    suffix: str = ""
    template: str = ""
    images: list[str] | None = None
    context: Any = None  # the old conversation-state tokens: accepted and ignored


class ShowRequest(Struct):
    model: str = ""
    name: str = ""  # older clients


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_generate_decoder = msgspec.json.Decoder(GenerateRequest)
_show_decoder = msgspec.json.Decoder(ShowRequest)

# -- translation --------------------------------------------------------------------------------


def to_generate(body: ChatRequest | GenerateRequest, card: ModelCard) -> Generate:
    if body.format not in (None, ""):
        raise BadRequest("format (structured outputs) is not supported yet")
    if body.think and card.capabilities and "thinking" not in card.capabilities:
        raise BadRequest(f'"{body.model}" does not support thinking')
    template_kwargs = {"reasoning_effort": body.think} if isinstance(body.think, str) else {}
    base = Generate(
        id=0,
        model=card.name,
        params=_sampling(body.options or Options(), (body.top_logprobs or 0) if body.logprobs else None),
        think=None if body.think is None else bool(body.think),
        template_kwargs=template_kwargs,
    )
    if isinstance(body, ChatRequest):
        if body.tools and card.capabilities and "tools" not in card.capabilities:
            raise BadRequest(f'"{body.model}" does not support tools')
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        return msgspec.structs.replace(base, messages=messages, tools=body.tools)
    if body.suffix:
        raise BadRequest("suffix is not supported")
    if body.template:
        raise BadRequest("a per-request template is not supported")
    if body.images:
        raise BadRequest("images are not supported: the served models read text only")
    if body.raw:
        return msgspec.structs.replace(base, prompt=body.prompt)
    system = [ChatMessage(role="system", content=body.system)] if body.system else []
    return msgspec.structs.replace(base, messages=[*system, ChatMessage(role="user", content=body.prompt)])


def _sampling(options: Options, logprobs: int | None) -> SamplingParams:
    num_predict = options.num_predict
    return SamplingParams(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=max(options.top_k, 0),
        min_p=options.min_p,
        seed=options.seed if options.seed is not None and options.seed >= 0 else None,
        repetition_penalty=options.repeat_penalty if options.repeat_penalty and options.repeat_penalty > 0 else 1.0,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        stop=[options.stop] if isinstance(options.stop, str) else list(options.stop or ()),
        logprobs=logprobs,
    )


def _message(message: Message, index: int) -> ChatMessage:
    if message.images:
        raise BadRequest(f"messages[{index}].images: images are not supported: the served models read text only")
    calls = [
        ToolCall(function=ToolCallFunction(name=c.function.name, arguments=c.function.arguments), id=c.id)
        for c in message.tool_calls or ()
    ]
    return ChatMessage(
        role=message.role,
        content=message.content or "",
        name=message.tool_name,
        tool_calls=calls or None,
        reasoning=message.thinking,
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


def chat_chunk(model: str, created_at: str, event: Delta) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.reasoning:
        message["thinking"] = event.reasoning
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
        "parameters": "",
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
        elif event.text or event.reasoning or event.logprobs:
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
    events = open_events(pool, [to_generate(body, card)], config.request_timeout)
    if body.stream:
        render = functools.partial(_lines, model=body.model, chat=chat, started=started)
        return await stream(request, events, render, _error_line, media_type="application/x-ndjson")
    [answer] = await fold_until_disconnect(request, events, 1)
    assert answer.done is not None  # the pool ends every stream with Done or an exception
    final = chat_final if chat else generate_final
    return JSONBody(final(body.model, timestamp(), answer.done, time.perf_counter_ns() - started, answer))


async def chat(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await decode_body(request, _chat_decoder)
    return await _answer(request, body, started)


async def generate(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await decode_body(request, _generate_decoder)
    return await _answer(request, body, started)


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONBody({"version": request.app.state.config.version})


async def tags(request: Request) -> Response:
    modified_at = timestamp(request.app.state.started_at)
    return JSONBody({"models": [tag(card, modified_at) for card in request.app.state.pool.models()]})


async def ps(request: Request) -> Response:
    return JSONBody({"models": [running(card) for card in request.app.state.pool.models()]})


async def show_model(request: Request) -> Response:
    body = await decode_body(request, _show_decoder)
    if not (body.model or body.name):
        raise BadRequest("model is required")
    card = request.app.state.pool.find_model(body.model or body.name)
    return JSONBody(show(card, timestamp(request.app.state.started_at)))


def routes() -> list[BaseRoute]:
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show_model, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]
