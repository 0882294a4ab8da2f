"""The Ollama dialect's requests: the bodies /api/chat, /api/generate and /api/show accept, and their translation
into protocol messages. Whatever cannot be served is a 400 here, before anything reaches a worker."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from common.protocol import (
    ChatMessage,
    Generate,
    ModelCard,
    Penalty,
    Probability,
    SamplingParams,
    Temperature,
    ToolCall,
    ToolCallFunction,
)
from gateway.errors import BadRequest
from gateway.request_types import Seed, Tool, cap_tokens, cap_top_k, tool_schemas

MAX_STOPS = 64  # stop strings are matched against every token's text: a bound keeps that cheap
MAX_REPEAT_PENALTY = 100.0  # logits are divided or multiplied by it: past this they leave float range sense

# -- requests: unknown fields (and options such as num_ctx, repeat_last_n, mirostat) are ignored -------


class Options(Struct, kw_only=True):
    # Ollama's sampler defaults. repeat_penalty stays off: Ollama's 1.1 applies to the last 64 tokens only,
    # the worker's penalty to the whole sequence.
    temperature: Temperature = 0.8
    top_p: Probability = 0.9
    top_k: int = 40  # <= 0: off; past the vocabulary: off too
    min_p: Probability = 0.0
    num_predict: int | None = None  # -1: unlimited, -2: fill the context; both "up to the context" here
    seed: Seed | None = None  # < 0: random, as Ollama's -1
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOPS)] | None = None
    repeat_penalty: Annotated[float, Meta(le=MAX_REPEAT_PENALTY)] | None = None  # <= 0: off
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
    tools: list[Tool] | None = None


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


chat_decoder = msgspec.json.Decoder(ChatRequest)
generate_decoder = msgspec.json.Decoder(GenerateRequest)
show_decoder = msgspec.json.Decoder(ShowRequest)

# -- translation --------------------------------------------------------------------------------


def to_generate(body: ChatRequest | GenerateRequest, card: ModelCard) -> Generate:
    if body.think and card.capabilities and "thinking" not in card.capabilities:
        raise BadRequest(f'"{body.model}" does not support thinking')
    template_kwargs = {"reasoning_effort": body.think} if isinstance(body.think, str) else {}
    base = Generate(
        id=0,
        model=card.name,
        params=_sampling(
            body.options or Options(),
            card,
            (body.top_logprobs or 0) if body.logprobs else None,
            json_schema(body.format),
        ),
        think=None if body.think is None else bool(body.think),
        template_kwargs=template_kwargs,
    )
    if isinstance(body, ChatRequest):
        if body.tools and card.capabilities and "tools" not in card.capabilities:
            raise BadRequest(f'"{body.model}" does not support tools')
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        return msgspec.structs.replace(base, messages=messages, tools=tool_schemas(body.tools))
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


def json_schema(format_: Any) -> str | None:
    """`format`: "json" (any JSON object, as Ollama's JSON grammar), a JSON Schema, or nothing."""
    if format_ in (None, ""):
        return None
    if format_ == "json":
        return '{"type":"object"}'
    if isinstance(format_, dict):
        return msgspec.json.encode(format_).decode()
    raise BadRequest(f'invalid format: {msgspec.json.encode(format_).decode()}; expected "json" or a valid JSON Schema')


def _sampling(options: Options, card: ModelCard, logprobs: int | None, json_schema: str | None) -> SamplingParams:
    num_predict = options.num_predict
    return SamplingParams(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=cap_top_k(options.top_k, card),
        min_p=options.min_p,
        seed=options.seed if options.seed is not None and options.seed >= 0 else None,
        repetition_penalty=options.repeat_penalty if options.repeat_penalty and options.repeat_penalty > 0 else 1.0,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        max_tokens=cap_tokens(num_predict, card) if num_predict is not None and num_predict > 0 else None,
        stop=[options.stop] if isinstance(options.stop, str) else list(options.stop or ()),
        logprobs=logprobs,
        json_schema=json_schema,
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
