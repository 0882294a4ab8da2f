"""Request field types both dialects share: the ranges a worker can take, and tool definitions.

JSON numbers have no size limit and msgspec decodes them whole; the wire to the worker (msgpack) carries 64 bits.
So every number is range-checked here (a 400 naming the field) or capped where a larger value has an obvious
meaning (a token limit past the context means "up to the context").
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from common.control import parse_duration
from common.protocol import ModelCard
from gateway.errors import BadRequest

logger = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Seed = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]  # as vLLM: a signed 64-bit integer
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]


class FunctionDefinition(Struct, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema object
    strict: bool | None = None


class Tool(Struct, omit_defaults=True):
    """A function the model may call, in the shape both OpenAI and Ollama take."""

    type: Literal["function"]
    function: FunctionDefinition


def tool_schemas(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as the plain JSON the chat template renders."""
    return [msgspec.to_builtins(tool) for tool in tools] if tools else None


def cap_tokens(value: int | None, card: ModelCard) -> int | None:
    """A token limit past the model's context is the context (the worker caps it by what the prompt leaves)."""
    return None if value is None else min(value, card.context_length)


def cap_top_k(value: int, card: ModelCard) -> int:
    """top_k <= 0 is off; any k past the vocabulary keeps every token, as off does."""
    return 0 if value <= 0 else min(value, card.vocab_size or 2**31 - 1)


def wrap_seed(seed: int) -> int:
    """seed + i for the i-th choice, kept inside the signed 64-bit range (wrapping around)."""
    return (seed - INT64_MIN) % 2**64 + INT64_MIN


def check_token_ids(ids: list[int], card: ModelCard, param: str) -> None:
    """Token ids from the client must be ids of the served model."""
    vocab = card.vocab_size or 2**31  # a card without it (an older worker): at least what fits the wire
    bad = sorted({i for i in ids if not 0 <= i < vocab})
    if bad:
        raise BadRequest(f"{param}: token ids must be 0 to {vocab - 1} for this model; got {bad[:5]}", param=param)


def output_limit(requested: int | None, card: ModelCard, server_default: int | None) -> int | None:
    """The request's limit (capped at the context); unset: the model's default, else the server's."""
    if requested is not None:
        return cap_tokens(requested, card)
    return cap_tokens(card.defaults.max_tokens or server_default, card)


def usable_tools(
    tools: list[Tool] | None, card: ModelCard, *, strict: bool, forced: bool
) -> list[dict[str, Any]] | None:
    """The tools to send. A model whose chat template cannot render tools gets none (chat UIs send theirs with
    every request) unless the server is strict (400) or the client forces a call, which the grammar can do alone."""
    if not tools or forced or tools_supported(card):
        return tool_schemas(tools)
    if strict:
        raise BadRequest(f'"{card.name}" does not support tools', param="tools")
    return None


def tools_supported(card: ModelCard) -> bool:
    return not card.capabilities or "tools" in card.capabilities


def ignored_tools_header(asked: list[Any] | None, sent: list[Any] | None, card: ModelCard) -> dict[str, str]:
    """The response header saying the request's tools were not shown to the model (see usable_tools)."""
    if not asked or sent or tools_supported(card):
        return {}
    logger.warning("a request's %d tools ignored: the chat template of %s cannot render tools", len(asked), card.name)
    return {"warning": f'299 tandem "tools ignored: the chat template of {card.name} cannot render tools"'}


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive (also taken on the OpenAI routes): seconds as a number or a duration string ("5m",
    "1h30m"); negative keeps the model loaded forever (-1), 0 unloads it after the request; None: the server's
    default (--keep-alive)."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected seconds or a duration string, got {msgspec.json.encode(value).decode()}")
        seconds = float(value) if not isinstance(value, str) else parse_duration(value)
    except ValueError as exc:
        raise BadRequest(f"keep_alive: {exc}", param="keep_alive") from None
    return -1.0 if seconds < 0 else seconds
