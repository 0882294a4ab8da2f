"""The Ollama dialect's requests: the bodies /api/chat, /api/generate and /api/show accept, and their translation
into protocol messages. Whatever cannot be served is a 400 here, before anything reaches a worker."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from common.protocol import (
    ChatMessage,
    Generate,
    GenerationDefaults,
    ModelCard,
    Penalty,
    Probability,
    SamplingParams,
    Temperature,
    ToolCall,
    ToolCallFunction,
)
from gateway.config import GatewayConfig
from gateway.errors import BadRequest
from gateway.request_types import Seed, Tool, cap_top_k, output_limit, usable_tools

# Ollama's sampler defaults. repeat_penalty stays off: Ollama's 1.1 applies to the last 64 tokens only, the
# worker's penalty to the whole sequence.
OLLAMA_DEFAULTS = GenerationDefaults(temperature=0.8, top_p=0.9, top_k=40)
DEFAULTS = GatewayConfig(workers=())  # the server's defaults, for callers without a config (tests)
MAX_STOPS = 64  # stop strings are matched against every token's text: a bound keeps that cheap
MAX_REPEAT_PENALTY = 100.0  # logits are divided or multiplied by it: past this they leave float range sense

T = TypeVar("T")

# -- requests: unknown fields (and options such as num_ctx, repeat_last_n, mirostat) are ignored -------


class Options(Struct, kw_only=True):
    # Unset: the model's default (its generation_config or --param), else Ollama's (OLLAMA_DEFAULTS).
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: int | None = None  # <= 0: off; past the vocabulary: off too
    min_p: Probability | None = None
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


def to_generate(body: ChatRequest | GenerateRequest, card: ModelCard, config: GatewayConfig = DEFAULTS) -> Generate:
    if body.think and card.capabilities and "thinking" not in card.capabilities:
        raise BadRequest(f'"{body.model}" does not support thinking')
    template_kwargs = {"reasoning_effort": body.think} if isinstance(body.think, str) else {}
    base = Generate(
        id=0,
        model=card.name,
        params=_sampling(
            body.options or Options(),
            card,
            config,
            (body.top_logprobs or 0) if body.logprobs else None,
            json_schema(body.format),
        ),
        think=None if body.think is None else bool(body.think),
        template_kwargs=template_kwargs,
    )
    if isinstance(body, ChatRequest):
        tools = usable_tools(body.tools, card, strict=config.strict_tools, forced=False)  # none: Ollama forces none
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        return msgspec.structs.replace(base, messages=messages, tools=tools)
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


def _sampling(
    options: Options, card: ModelCard, config: GatewayConfig, logprobs: int | None, json_schema: str | None
) -> SamplingParams:
    """What the request's options set, else the model's defaults (card.defaults), else Ollama's."""
    model = card.defaults
    num_predict = options.num_predict
    if num_predict is not None and num_predict <= 0:  # -1 unlimited, -2 fill the context: up to the context
        max_tokens = None
    else:
        max_tokens = output_limit(num_predict, card, config.default_max_tokens)
    repeat_penalty = _first(options.repeat_penalty, model.repetition_penalty, 1.0)
    stop = options.stop if options.stop is not None else model.stop
    return SamplingParams(
        temperature=_first(options.temperature, model.temperature, OLLAMA_DEFAULTS.temperature),
        top_p=_first(options.top_p, model.top_p, OLLAMA_DEFAULTS.top_p),
        top_k=cap_top_k(_first(options.top_k, model.top_k, OLLAMA_DEFAULTS.top_k), card),
        min_p=_first(options.min_p, model.min_p, 0.0),
        seed=options.seed if options.seed is not None and options.seed >= 0 else None,
        repetition_penalty=repeat_penalty if repeat_penalty > 0 else 1.0,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        max_tokens=max_tokens,
        stop=[stop] if isinstance(stop, str) else list(stop),
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


def _first(*values: T | None) -> T:
    """The first value that is set."""
    return next(value for value in values if value is not None)  # type: ignore[misc]
