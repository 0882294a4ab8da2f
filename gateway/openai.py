"""The OpenAI dialect: /v1/chat/completions, /v1/completions and /v1/models, as the official SDK expects them."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import BadRequest, GatewayError
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
from worker.protocol import (
    ChatMessage,
    Delta,
    Done,
    Generate,
    Logprob,
    ModelCard,
    Penalty,
    PositiveFloat,
    Probability,
    SamplingParams,
    ToolCall,
    ToolCallFunction,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# -- requests: every optional field also takes null, as OpenAI's API does; unknown fields are ignored ----

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
Stop = str | Annotated[list[str], Meta(max_length=16)]  # OpenAI allows 4; vLLM and others more
MAX_CHOICES = 16


class StreamOptions(Struct):
    include_usage: bool | None = None


class Sampling(Struct, kw_only=True):
    """What both completion endpoints take."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None
    stop: Stop | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    # vLLM's extras
    top_k: Annotated[int, Meta(ge=-1)] | None = None  # -1 or 0: off
    min_p: Probability | None = None
    repetition_penalty: PositiveFloat | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None


class ContentPart(Struct):
    type: str
    text: str | None = None


class FunctionCall(Struct):
    name: str
    arguments: str = ""  # a JSON string, as OpenAI sends it


class MessageToolCall(Struct):
    function: FunctionCall
    id: str | None = None
    type: str = "function"


class Message(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # earlier turns' thinking, as vLLM and DeepSeek name it
    reasoning: str | None = None


class ResponseFormat(Struct):
    type: str = "text"


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: MaxTokens | None = 16  # OpenAI's default here; an explicit null means "up to the context"
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    best_of: int | None = None


_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

# -- translation --------------------------------------------------------------------------------


def to_generate(body: ChatCompletionRequest, card: ModelCard) -> Generate:
    """A chat request as one Generate (choice 0; `for_choices` makes the rest)."""
    if body.response_format is not None and body.response_format.type != "text":
        raise BadRequest(f"response_format '{body.response_format.type}' is not supported yet", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    template_kwargs = dict(body.chat_template_kwargs or {})
    think = template_kwargs.pop("enable_thinking", None)
    if think is not None and not isinstance(think, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
    if body.reasoning_effort is not None:
        template_kwargs.setdefault("reasoning_effort", body.reasoning_effort)  # gpt-oss style templates read it
    return Generate(
        id=0,
        model=card.name,
        params=_sampling(
            body,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        ),
        messages=[_message(message, i) for i, message in enumerate(body.messages)],
        tools=body.tools if body.tools and body.tool_choice != "none" else None,
        think=think,
        template_kwargs=template_kwargs,
    )


def text_to_generate(body: CompletionRequest, card: ModelCard, prompt: str) -> Generate:
    """One prompt of a legacy completion request: the raw text, no chat template."""
    if body.suffix:
        raise BadRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise BadRequest("best_of is not supported; use n", param="best_of")
    return Generate(id=0, model=card.name, params=_sampling(body, body.max_tokens, body.logprobs), prompt=prompt)


def for_choices(generate: Generate, n: int) -> list[Generate]:
    """n independent samples; a seeded request gets seeds seed, seed+1, … so its choices differ."""
    seed = generate.params.seed
    if n == 1 or seed is None:
        return [generate] * n
    return [
        msgspec.structs.replace(generate, params=msgspec.structs.replace(generate.params, seed=seed + i))
        for i in range(n)
    ]


def _sampling(body: Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        temperature=_or(body.temperature, 1.0),
        top_p=_or(body.top_p, 1.0),
        top_k=max(_or(body.top_k, 0), 0),
        min_p=_or(body.min_p, 0.0),
        seed=body.seed,
        repetition_penalty=_or(body.repetition_penalty, 1.0),
        presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        logit_bias=_logit_bias(body.logit_bias),
        max_tokens=max_tokens,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or ()),
        stop_token_ids=list(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
    )


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    try:
        return {int(token): value for token, value in (bias or {}).items()}
    except ValueError:
        raise BadRequest('logit_bias keys must be token ids, e.g. {"50256": -100}', param="logit_bias") from None


def _message(message: Message, index: int) -> ChatMessage:
    calls = [
        ToolCall(function=ToolCallFunction(name=c.function.name, arguments=c.function.arguments), id=c.id, type=c.type)
        for c in message.tool_calls or ()
    ]
    return ChatMessage(
        role="system" if message.role == "developer" else message.role,
        content=_text(message.content, f"messages[{index}].content"),
        name=message.name,
        tool_calls=calls or None,
        tool_call_id=message.tool_call_id,
        reasoning=message.reasoning_content or message.reasoning,
    )


def _text(content: str | list[ContentPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type in ("image_url", "input_image"):
            raise BadRequest("Image inputs are not supported: the served models read text only", param=param)
        if part.type != "text":
            raise BadRequest(f"Content parts of type '{part.type}' are not supported", param=param)
    return "\n".join(part.text or "" for part in content)  # as vLLM joins text parts


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
    delta: dict[str, Any] = {}
    if event.reasoning:
        delta["reasoning_content"] = event.reasoning
        if reasoning_field:
            delta["reasoning"] = event.reasoning
    if event.text:
        delta["content"] = event.text
    return delta


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
        out: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.reasoning:
            out["reasoning_content"] = choice.reasoning
            if reasoning_field:
                out["reasoning"] = choice.reasoning
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
    started: set[int] = set()
    dones: dict[int, Done] = {}
    async for index, event in events:
        if index not in started:
            started.add(index)
            yield sse(chat_chunk(reply, index, {"role": "assistant", "content": ""}))
        if isinstance(event, Done):
            dones[index] = event
            yield sse(chat_chunk(reply, index, {}, finish_reason=event.finish_reason))
            continue
        delta = chat_delta(event, reasoning_field)
        token_logprobs = chat_logprobs(event.logprobs) if logprobs and event.logprobs else None
        if delta or token_logprobs:
            yield sse(chat_chunk(reply, index, delta, logprobs=token_logprobs))
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

Endpoint = Callable[[Request], Awaitable[Response]]


def _with_request_id(endpoint: Endpoint) -> Endpoint:
    """Echo the client's x-request-id (or a new one) on every answer, errors included."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        request_id = request.headers.get("x-request-id", "")[:200] or uuid.uuid4().hex
        logger.debug("request %s: %s %s", request_id, request.method, request.url.path)
        try:
            response = await endpoint(request)
        except GatewayError as exc:
            logger.info("request %s: %d %s", request_id, exc.status, exc.message)
            response = render_error(exc)
        response.headers["x-request-id"] = request_id
        return response

    return wrapper


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


@_with_request_id
async def chat_completions(request: Request) -> Response:
    body = await decode_body(request, _chat_decoder)
    pool, config = request.app.state.pool, request.app.state.config
    card = pool.find_model(body.model)
    requests = for_choices(to_generate(body, card), body.n or 1)
    events = open_events(pool, requests, config.request_timeout)
    reply = _reply("chatcmpl", body, card, request)
    options = {"reasoning_field": config.reasoning_field, "logprobs": bool(body.logprobs)}
    if body.stream:
        render = functools.partial(_chat_chunks, reply=reply, per_prompt=len(requests), **options)
        return await stream(request, events, render, _error_frame, media_type="text/event-stream", headers=_SSE_HEADERS)
    choices = await fold_until_disconnect(request, events, len(requests))
    return JSONBody(chat_completion(reply, choices, **options))


@_with_request_id
async def completions(request: Request) -> Response:
    body = await decode_body(request, _completion_decoder)
    pool, config = request.app.state.pool, request.app.state.config
    card = pool.find_model(body.model)
    prompts, n = [body.prompt] if isinstance(body.prompt, str) else body.prompt, body.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise BadRequest(f"At most {MAX_CHOICES} choices per request (prompts × n)", param="n")
    requests = [g for prompt in prompts for g in for_choices(text_to_generate(body, card, prompt), n)]
    echoed = [prompt if body.echo else "" for prompt in prompts for _ in range(n)]
    events = open_events(pool, requests, config.request_timeout)
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
    }


@_with_request_id
async def list_models(request: Request) -> Response:
    created = int(request.app.state.started_at)
    return JSONBody(
        {"object": "list", "data": [model_object(card, created) for card in request.app.state.pool.models()]}
    )


@_with_request_id
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
