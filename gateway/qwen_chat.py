"""Seed 002, Qwen-7B-Chat behind FastAPI: `POST /` with `{prompt, history: [[user, assistant], …]}`, answering
`{response, history, status: 200, time}` as the seed's `model.chat` call did.

Defaults as the seed's: top_p 0.7, temperature 0.95, max_length 2048, where max_length is Hugging Face's
(prompt and output together). One difference: the seed replaced any falsy value by its default, so temperature 0
sampled at 0.95; here 0 means greedy, which is what a client sending it asks for.
"""

from __future__ import annotations

import datetime

import msgspec
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from common.protocol import ChatMessage
from gateway import seeds
from gateway.streaming import JSONBody

Exchange = tuple[str, str]  # (user, assistant)


class ChatRequest(Struct):
    prompt: str
    history: list[Exchange] | None = None
    max_length: seeds.PositiveInt | None = None
    top_p: seeds.Probability | None = None
    temperature: seeds.Temperature | None = None


class ChatResponse(Struct):
    response: str
    history: list[Exchange]  # the request's history and this exchange
    status: int
    time: str  # the server's local time, "YYYY-MM-DD HH:MM:SS"


chat_decoder = msgspec.json.Decoder(ChatRequest)


def to_messages(body: ChatRequest) -> list[ChatMessage]:
    turns = [
        ChatMessage(role=role, content=text)
        for user, assistant in body.history or ()
        for role, text in (("user", user), ("assistant", assistant))
    ]
    return [*turns, *seeds.user(body.prompt)]


async def chat(request: Request) -> Response:
    body = await seeds.decode(request, chat_decoder)
    params = seeds.sampling(
        request,
        temperature=0.95 if body.temperature is None else body.temperature,
        top_p=0.7 if body.top_p is None else body.top_p,
        max_length=body.max_length or 2048,
    )
    answer = await seeds.answer(request, seeds.chat(seeds.served_model(request), to_messages(body), params))
    history = [*(body.history or ()), (body.prompt, answer.text)]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return JSONBody(ChatResponse(response=answer.text, history=history, status=200, time=now))


def routes() -> list[BaseRoute]:
    return [Route("/", chat, methods=["POST"])]
