"""The OpenAI dialect's requests: the bodies it accepts and their translation into protocol messages.

Every optional field also takes null, as OpenAI's API does; unknown fields are ignored, so a client on a newer SDK
still gets an answer. Whatever cannot be served is a 400 here, before anything reaches a worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from common.protocol import (
    ChatMessage,
    ForcedToolCall,
    Generate,
    ModelCard,
    Penalty,
    PositiveFloat,
    Probability,
    SamplingParams,
    ToolCall,
    ToolCallFunction,
)
from gateway.config import GatewayConfig
from gateway.errors import BadRequest
from gateway.request_types import (
    Seed,
    TokenId,
    Tool,
    cap_top_k,
    check_token_ids,
    output_limit,
    tool_schemas,
    usable_tools,
    wrap_seed,
)

DEFAULTS = GatewayConfig(workers=())  # the server's defaults, for callers without a config (tests)

T = TypeVar("T")

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
    seed: Seed | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    # vLLM's extras
    top_k: Annotated[int, Meta(ge=-1)] | None = None  # -1 or 0: off; past the vocabulary: off too
    min_p: Probability | None = None
    repetition_penalty: PositiveFloat | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    keep_alive: Any = None  # Ollama's, as an extension: how long the model stays loaded after this request


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


class JSONSchemaFormat(Struct):
    name: str = ""  # OpenAI requires it; it names the schema and changes nothing here
    schema: dict[str, Any] | None = None  # None: any JSON
    strict: bool | None = None  # the output always follows the schema here, strict or not
    description: str | None = None


class ResponseFormat(Struct):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # one call per forced answer; free answers may hold several
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=MAX_CHOICES)]
    max_tokens: MaxTokens | None = 16  # OpenAI's default here; an explicit null means "up to the context"
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    best_of: int | None = None


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)

# -- translation --------------------------------------------------------------------------------


def to_generate(body: ChatCompletionRequest, card: ModelCard, config: GatewayConfig = DEFAULTS) -> Generate:
    """A chat request as one Generate (choice 0; `for_choices` makes the rest)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    template_kwargs = dict(body.chat_template_kwargs or {})
    think = template_kwargs.pop("enable_thinking", None)
    if think is not None and not isinstance(think, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
    if body.reasoning_effort is not None:
        template_kwargs.setdefault("reasoning_effort", body.reasoning_effort)  # gpt-oss style templates read it
    params = _sampling(
        body,
        card,
        config,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    forced = forced_tool_call(body.tool_choice, tool_schemas(body.tools))
    tools = None
    if body.tool_choice != "none":
        tools = usable_tools(body.tools, card, strict=config.strict_tools, forced=forced is not None)
    return Generate(
        id=0,
        model=card.name,
        params=msgspec.structs.replace(params, json_schema=json_schema(body.response_format)),
        messages=[_message(message, i) for i, message in enumerate(body.messages)],
        tools=tools,
        force_tool_call=forced,
        think=think,
        template_kwargs=template_kwargs,
    )


def json_schema(response_format: ResponseFormat | None) -> str | None:
    """The JSON Schema, as text, that the answer must follow; None for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return '{"type":"object"}'
    if response_format.json_schema is None:
        raise BadRequest("Missing required parameter: 'response_format.json_schema'.", param="response_format")
    return msgspec.json.encode(response_format.json_schema.schema or {}).decode()


def forced_tool_call(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]] | None) -> ForcedToolCall | None:
    """tool_choice "required" or {"type": "function", "function": {"name": …}}: the answer must be that call."""
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise BadRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
        )
    if choice == "required":
        return ForcedToolCall()
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": …}}.',
            param="tool_choice",
        )
    if name not in {f.get("name") for tool in tools if isinstance(f := tool.get("function"), dict)}:
        raise BadRequest(
            f"Invalid value for 'tool_choice': no function named '{name}' was specified in the 'tools' parameter.",
            param="tool_choice",
        )
    return ForcedToolCall(name=name)


def text_to_generate(
    body: CompletionRequest, card: ModelCard, prompt: str, config: GatewayConfig = DEFAULTS
) -> Generate:
    """One prompt of a legacy completion request: the raw text, no chat template."""
    if body.suffix:
        raise BadRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise BadRequest("best_of is not supported; use n", param="best_of")
    return Generate(
        id=0, model=card.name, params=_sampling(body, card, config, body.max_tokens, body.logprobs), prompt=prompt
    )


def for_choices(generate: Generate, n: int) -> list[Generate]:
    """n independent samples; a seeded request gets seeds seed, seed+1, … so its choices differ."""
    seed = generate.params.seed
    if n == 1 or seed is None:
        return [generate] * n
    return [
        msgspec.structs.replace(generate, params=msgspec.structs.replace(generate.params, seed=wrap_seed(seed + i)))
        for i in range(n)
    ]


def _sampling(
    body: Sampling, card: ModelCard, config: GatewayConfig, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """What the request sets, else the model's defaults (card.defaults), else OpenAI's."""
    stop_token_ids = list(body.stop_token_ids or ())
    check_token_ids(stop_token_ids, card, "stop_token_ids")
    model = card.defaults
    stop = body.stop if body.stop is not None else model.stop
    return SamplingParams(
        temperature=_or(body.temperature, _or(model.temperature, 1.0)),
        top_p=_or(body.top_p, _or(model.top_p, 1.0)),
        top_k=cap_top_k(_or(body.top_k, _or(model.top_k, 0)), card),
        min_p=_or(body.min_p, _or(model.min_p, 0.0)),
        seed=body.seed,
        repetition_penalty=_or(body.repetition_penalty, _or(model.repetition_penalty, 1.0)),
        presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        logit_bias=_logit_bias(body.logit_bias, card),
        max_tokens=output_limit(max_tokens, card, config.default_max_tokens),
        stop=[stop] if isinstance(stop, str) else list(stop),
        stop_token_ids=stop_token_ids,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
    )


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def _logit_bias(bias: dict[str, float] | None, card: ModelCard) -> dict[int, float]:
    try:
        parsed = {int(token): value for token, value in (bias or {}).items()}
    except ValueError:
        raise BadRequest('logit_bias keys must be token ids, e.g. {"50256": -100}', param="logit_bias") from None
    check_token_ids(list(parsed), card, "logit_bias")
    return parsed


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
