"""Embeddings in both dialects: OpenAI's /v1/embeddings, Ollama's /api/embed and its legacy /api/embeddings.

One Embed per request carries every input to the embedding model's worker, which encodes them (with those of
concurrent requests) in batches and answers float32 L2-normalised vectors. OpenAI's `base64` is those bytes as they
are (what its SDK asks for when numpy is installed); `float` is the same values as JSON numbers, so both decode to
the same vectors. A chat model is not asked for embeddings: it is a 400 naming the model (see worker/engine.py).
"""

from __future__ import annotations

import array
import base64
import sys
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from common.protocol import Embed, Embeddings, EmbedInput, ModelCard
from gateway.errors import BadRequest
from gateway.request_types import check_token_ids, keep_alive_seconds
from gateway.streaming import JSONBody, decode_body, until_disconnect, within

MAX_INPUTS = 2048  # OpenAI's limit per request
Dimensions = Annotated[int, Meta(ge=1)]


class OpenAIRequest(Struct, kw_only=True):
    model: str
    input: Any  # a string, a list of strings, a token list or a list of token lists
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Dimensions | None = None
    user: str | None = None
    keep_alive: Any = None  # Ollama's, as an extension


class EmbedRequest(Struct, kw_only=True):
    """Ollama's /api/embed."""

    model: str
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: Dimensions | None = None
    keep_alive: Any = None
    options: dict[str, Any] | None = None  # runner options (num_ctx, …): accepted, not used by an encoder


class LegacyRequest(Struct, kw_only=True):
    """Ollama's older /api/embeddings: one prompt, one vector."""

    model: str
    prompt: str = ""
    keep_alive: Any = None
    options: dict[str, Any] | None = None


openai_decoder = msgspec.json.Decoder(OpenAIRequest)
embed_decoder = msgspec.json.Decoder(EmbedRequest)
legacy_decoder = msgspec.json.Decoder(LegacyRequest)


def openai_inputs(value: Any, card: ModelCard) -> list[EmbedInput]:
    """OpenAI's four input forms as a list of texts or token lists; each must hold something."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadRequest(
            "input must be a non-empty string, list of strings, token list or list of token lists", param="input"
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        value = [value]  # one token list
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"input: at most {MAX_INPUTS} inputs per request", param="input")
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise BadRequest(f"input[{index}] is an empty string", param="input")
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            check_token_ids(item, card, "input")
        else:
            raise BadRequest(
                f"input[{index}] must be a non-empty string or a non-empty list of token ids", param="input"
            )
    return value


def embedding_card(request: Request, model: str, dimensions: int | None) -> ModelCard:
    card: ModelCard = request.app.state.pool.find_model(model)
    if "embedding" not in card.capabilities:
        raise BadRequest(f'"{model}" does not support embeddings: use an embedding model', param="model")
    if dimensions is not None and card.embedding_length and dimensions > card.embedding_length:
        raise BadRequest(f"dimensions must be at most {card.embedding_length} for {model}", param="dimensions")
    return card


async def run_embed(request: Request, embed: Embed, keep_alive: float | None) -> Embeddings:
    pool, timeout = request.app.state.pool, request.app.state.config.request_timeout
    result: Embeddings = await until_disconnect(request, within(pool.embed(embed, keep_alive), timeout))
    return result


def floats(vector: bytes) -> list[float]:
    values = array.array("f")
    values.frombytes(vector)
    if sys.byteorder != "little":  # the wire is little-endian, as OpenAI's base64 is
        values.byteswap()
    return values.tolist()


# -- endpoints ----------------------------------------------------------------------------------


async def openai_embeddings(request: Request) -> Response:
    body = await decode_body(request, openai_decoder)
    card = embedding_card(request, body.model, body.dimensions)
    inputs = openai_inputs(body.input, card)
    embed = Embed(id=0, model=card.name, inputs=inputs, dimensions=body.dimensions)
    result = await run_embed(request, embed, keep_alive_seconds(body.keep_alive))
    encode: Any = (lambda v: base64.b64encode(v).decode()) if body.encoding_format == "base64" else floats
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.num_prompt_tokens, "total_tokens": result.num_prompt_tokens}
    return JSONBody({"object": "list", "data": data, "model": body.model, "usage": usage})


async def ollama_embed(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await decode_body(request, embed_decoder)
    card = embedding_card(request, body.model, body.dimensions)
    keep_alive = keep_alive_seconds(body.keep_alive)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not any(inputs):  # nothing to embed: load (or, with keep_alive 0, unload) the model, as Ollama does
        load = await _load_or_unload(request, body.model, keep_alive)
        return JSONBody({"model": body.model, "embeddings": [], "total_duration": _since(started), **load})
    if len(inputs) > MAX_INPUTS or not all(inputs):
        raise BadRequest(f"input: 1 to {MAX_INPUTS} non-empty strings")
    embed = Embed(id=0, model=card.name, inputs=list(inputs), truncate=body.truncate, dimensions=body.dimensions)
    result = await run_embed(request, embed, keep_alive)
    return JSONBody(
        {
            "model": body.model,
            "embeddings": [floats(vector) for vector in result.vectors],
            "total_duration": _since(started),
            "load_duration": int(result.timings.load * 1e9),
            "prompt_eval_count": result.num_prompt_tokens,
        }
    )


async def ollama_embeddings(request: Request) -> Response:
    body = await decode_body(request, legacy_decoder)
    card = embedding_card(request, body.model, None)
    keep_alive = keep_alive_seconds(body.keep_alive)
    if not body.prompt:
        await _load_or_unload(request, body.model, keep_alive)
        return JSONBody({"embedding": []})
    result = await run_embed(request, Embed(id=0, model=card.name, inputs=[body.prompt]), keep_alive)
    return JSONBody({"embedding": floats(result.vectors[0])})


async def _load_or_unload(request: Request, model: str, keep_alive: float | None) -> dict[str, int]:
    pool, timeout = request.app.state.pool, request.app.state.config.request_timeout
    if keep_alive == 0:
        await until_disconnect(request, within(pool.unload(model), timeout))
        return {"load_duration": 0}
    waited = await until_disconnect(request, within(pool.load(model, keep_alive), timeout))
    return {"load_duration": int(waited * 1e9)}


def _since(started: int) -> int:
    return time.perf_counter_ns() - started


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
        Route("/api/embed", ollama_embed, methods=["POST"]),
        Route("/api/embeddings", ollama_embeddings, methods=["POST"]),
    ]
