"""Seed 000, the Qwen3 service: /api/v1/chat, /api/v1/chat/stream (SSE), /api/v1/health, /api/v1/model/info and
/api/v1/model/load, as its `QwenClient` and JavaScript examples call them.

The seed generated with Qwen3's own sampling defaults and thinking on, and its stream showed the thinking live:
here the thinking travels in the chunks between `<think>` and `</think>`, as the seed's text streamer wrote it,
while the non-streamed answer is the reply alone, as the seed documents it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal

import msgspec
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from common.protocol import ChatMessage, Done, Generate, ModelCard
from gateway import seeds
from gateway.errors import GatewayError
from gateway.streaming import Indexed, JSONBody, open_events, sse, stream


class Turn(Struct):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Struct):
    message: seeds.NonEmpty
    history: list[Turn] = []


class ChatResponse(Struct):
    response: str
    success: bool
    error: str | None = None


class StreamEvent(Struct):
    type: Literal["start", "chunk", "end", "error"]
    content: str


class HealthResponse(Struct):
    status: str
    message: str


class ModelInfo(Struct):
    model_name: str
    device: str
    is_loaded: bool
    model_size: int  # bytes of weights: the serving worker's card, else the catalog's


class LoadRequest(Struct):
    """The seed's load takes no body; a client may name the model to load."""

    model_name: str | None = None


class LoadResponse(Struct):
    status: str
    message: str


chat_decoder = msgspec.json.Decoder(ChatRequest)
load_decoder = msgspec.json.Decoder(LoadRequest)


def to_generate(body: ChatRequest, card: ModelCard, request: Request) -> Generate:
    """The model's sampling defaults, else Qwen3's recommendation for thinking; thinking left to the template."""
    messages = [ChatMessage(role=turn.role, content=turn.content) for turn in body.history]
    params = seeds.sampling(request, **seeds.recommended(card))
    return seeds.chat(card, [*messages, *seeds.user(body.message)], params)


async def chunks(events: AsyncIterator[Indexed]) -> AsyncGenerator[bytes]:
    """start, the text (thinking between think tags) as chunks, end."""
    yield sse(StreamEvent("start", ""))
    thinking = False
    async for _, event in events:
        if isinstance(event, Done):
            break
        text = ""
        if event.reasoning:
            text, thinking = ("" if thinking else "<think>\n") + event.reasoning, True
        if event.text:
            text, thinking = text + ("\n</think>\n\n" if thinking else "") + event.text, False
        if text:
            yield sse(StreamEvent("chunk", text))
    if thinking:
        yield sse(StreamEvent("chunk", "\n</think>"))
    yield sse(StreamEvent("end", ""))


def error_event(exc: GatewayError) -> bytes:
    return sse(StreamEvent("error", exc.message))


async def chat(request: Request) -> Response:
    body = await seeds.decode(request, chat_decoder)
    answer = await seeds.answer(request, to_generate(body, seeds.served_model(request), request))
    return JSONBody(ChatResponse(response=answer.text, success=True))


async def chat_stream(request: Request) -> Response:
    body = await seeds.decode(request, chat_decoder)
    generate = to_generate(body, seeds.served_model(request), request)
    events = open_events(request.app.state.pool, [generate], request.app.state.config.request_timeout)
    return await stream(request, events, chunks, error_event, media_type="text/event-stream", headers=seeds.SSE_HEADERS)


async def health(request: Request) -> Response:
    seeds.served_model(request)  # 503 until a model is loaded
    return JSONBody(HealthResponse(status="healthy", message="The model is loaded and serving"))


async def model_info(request: Request) -> Response:
    card = seeds.served_model(request)
    worker = seeds.worker_info(request, card)
    size = (seeds.served_card(worker, card) or card).size_bytes
    device = worker.device if worker else ""
    return JSONBody(ModelInfo(model_name=card.name, device=device, is_loaded=worker is not None, model_size=size))


async def load_model(request: Request) -> Response:
    body = await seeds.decode(request, load_decoder) if seeds.has_body(request) else LoadRequest()
    card = await request.app.state.pool.ensure_loaded(body.model_name or seeds.served_model(request).name)
    return JSONBody(LoadResponse(status="loaded", message=f"Model {card.name} is loaded"))


def routes() -> list[BaseRoute]:
    return [
        Route("/api/v1/chat", chat, methods=["POST"]),
        Route("/api/v1/chat/stream", chat_stream, methods=["POST"]),
        Route("/api/v1/health", health, methods=["GET"]),
        Route("/api/v1/model/info", model_info, methods=["GET"]),
        Route("/api/v1/model/load", load_model, methods=["POST"]),
    ]
