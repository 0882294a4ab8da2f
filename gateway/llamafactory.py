"""Seed 003, the LLaMA-Factory service: /chat, /generate, /batch, /model/info, and its description at `GET /`.

`/generate` is also seed 001's: one route takes both seeds' fields (001's `max_length` and `do_sample`, 003's
`max_tokens` and `stream`) and answers both seeds' fields (003's `generated_text`, `usage`, `model`; 001's
`generation_time`). With `stream: true` (documented by the seed, its format not) /chat and /generate answer SSE:
`data: {"response"|"generated_text": piece}` events, a last event with `usage` and `model`, then `data: [DONE]`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from common.protocol import ChatMessage, Done, Generate
from gateway import seeds
from gateway.errors import GatewayError
from gateway.streaming import SSE_DONE, Indexed, JSONBody, open_events, sse, stream


class Message(Struct):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(seeds.Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    stream: bool = False


class GenerateRequest(seeds.Sampling, kw_only=True):
    prompt: seeds.NonEmpty
    stream: bool = False


class BatchRequest(seeds.Sampling, kw_only=True):
    prompts: Annotated[list[seeds.NonEmpty], Meta(min_length=1, max_length=64)]


class ChatResponse(Struct):
    response: str
    usage: seeds.Usage
    model: str


class GenerateResponse(Struct):
    generated_text: str
    usage: seeds.Usage
    model: str
    generation_time: float  # seconds (seed 001)


class BatchResponse(Struct):
    results: list[str]
    usage: seeds.Usage  # summed over the prompts
    model: str


class ModelInfo(Struct):
    model_name: str
    model_path: str
    adapter_path: str | None  # no LoRA adapters are served yet
    template: str  # the model family whose own chat template renders the prompts
    status: str  # "loaded" while a ready worker serves the model, "unloaded" when it is only listed


class ServiceInfo(Struct):
    message: str
    version: str
    docs: str
    health: str


chat_decoder = msgspec.json.Decoder(ChatRequest)
generate_decoder = msgspec.json.Decoder(GenerateRequest)
batch_decoder = msgspec.json.Decoder(BatchRequest)


def chat_to_generate(request: Request, body: ChatRequest) -> Generate:
    messages = [ChatMessage(role=m.role, content=m.content) for m in body.messages]
    return seeds.chat(seeds.served_model(request), messages, seeds.params_of(request, body))


def prompt_to_generate(request: Request, body: seeds.Sampling, prompt: str) -> Generate:
    """A prompt is one user turn through the model's chat template, as LLaMA-Factory's chat model sends it."""
    return seeds.chat(seeds.served_model(request), seeds.user(prompt), seeds.params_of(request, body))


def service_info(request: Request) -> ServiceInfo:
    version = request.app.state.config.version
    return ServiceInfo(message="tandem API service", version=version, docs="/docs", health="/health")


async def pieces(events: AsyncIterator[Indexed], field: str, model: str) -> AsyncGenerator[bytes]:
    dones: list[Done] = []
    async for _, event in events:
        if isinstance(event, Done):
            dones.append(event)
        elif event.text:
            yield sse({field: event.text})
    yield sse({field: "", "usage": seeds.usage_of(dones), "model": model})
    yield SSE_DONE


def _error_event(exc: GatewayError) -> bytes:
    return sse({"detail": exc.message})


async def _stream(request: Request, generate: Generate, field: str) -> Response:
    events = open_events(request.app.state.pool, [generate], request.app.state.config.request_timeout)
    render = functools.partial(pieces, field=field, model=generate.model)
    return await stream(
        request, events, render, _error_event, media_type="text/event-stream", headers=seeds.SSE_HEADERS
    )


async def chat(request: Request) -> Response:
    body = await seeds.decode(request, chat_decoder)
    generate = chat_to_generate(request, body)
    if body.stream:
        return await _stream(request, generate, "response")
    answer = await seeds.answer(request, generate)
    return JSONBody(ChatResponse(response=answer.text, usage=answer.usage, model=generate.model))


async def generate(request: Request) -> Response:
    body = await seeds.decode(request, generate_decoder)
    one = prompt_to_generate(request, body, body.prompt)
    if body.stream:
        return await _stream(request, one, "generated_text")
    answer = await seeds.answer(request, one)
    return JSONBody(
        GenerateResponse(
            generated_text=answer.text, usage=answer.usage, model=one.model, generation_time=round(answer.seconds, 4)
        )
    )


async def batch(request: Request) -> Response:
    body = await seeds.decode(request, batch_decoder)
    generates = [prompt_to_generate(request, body, prompt) for prompt in body.prompts]
    answers, _ = await seeds.answer_all(request, generates)
    usage = seeds.usage_of(a.done for a in answers)
    return JSONBody(BatchResponse(results=[a.text for a in answers], usage=usage, model=generates[0].model))


async def model_info(request: Request) -> Response:
    card = seeds.served_model(request)
    return JSONBody(
        ModelInfo(
            model_name=card.name,
            model_path=card.source,
            adapter_path=None,
            template=card.family or card.architecture,
            status="loaded" if seeds.worker_info(request, card) else "unloaded",
        )
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/chat", chat, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/batch", batch, methods=["POST"]),
        Route("/model/info", model_info, methods=["GET"]),
    ]
