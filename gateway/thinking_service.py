"""Seed 001, the Qwen3-4B-Thinking service: /thinking and /batch_generate (its /generate is shared with seed 003,
in `llamafactory`; its /health and /stats fields are in tandem's own answers).

The seed documents what these routes do, not their field names; the names here are the plain ones and the
README's API coverage lists them. `/thinking` runs the model with thinking on (the template's switch), gives
`thinking_depth` a thinking budget, and scores the answer by its tokens' probabilities: confidence is their
geometric mean, exp(mean log p) over the answer's tokens (the thinking's not counted), 0 when there is no answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from common.protocol import Done, Generate, ModelCard
from gateway import seeds
from gateway.errors import BadRequest
from gateway.llamafactory import GenerateResponse, prompt_to_generate
from gateway.streaming import Folded, Indexed, JSONBody, open_events, until_disconnect

MAX_BATCH = 10
ANSWER_TOKENS = 1024  # room for the answer after the thinking budget


def thinking_budget(depth: int) -> int:
    """Depth 1–5 → 256, 512, 1024, 2048, 4096 tokens of thinking."""
    return 256 << (depth - 1)


class ThinkingRequest(Struct):
    question: seeds.NonEmpty
    thinking_depth: Annotated[int, Meta(ge=1, le=5)] = 3
    include_reasoning: bool = True


class ThinkingResponse(Struct):
    answer: str
    reasoning: str | None  # null unless include_reasoning
    confidence: float  # 0–1: exp(mean log p) of the answer's tokens
    thinking_depth: int
    thinking_budget: int  # tokens
    generation_time: float  # seconds
    usage: seeds.Usage


class BatchGenerateRequest(seeds.Sampling, kw_only=True):
    prompts: Annotated[list[seeds.NonEmpty], Meta(min_length=1, max_length=MAX_BATCH)]


class BatchGenerateResponse(Struct):
    results: list[GenerateResponse]  # in the order of `prompts`
    batch_size: int
    total_time: float  # seconds for the whole batch


thinking_decoder = msgspec.json.Decoder(ThinkingRequest)
batch_decoder = msgspec.json.Decoder(BatchGenerateRequest)


def to_generate(request: Request, body: ThinkingRequest, card: ModelCard) -> Generate:
    if "thinking" not in card.capabilities:
        raise BadRequest(f"The model '{card.name}' does not support thinking")
    budget = thinking_budget(body.thinking_depth)
    cap = request.app.state.config.seed_max_tokens
    if cap is not None:
        budget = min(budget, cap // 2)  # under --seed-max-tokens, half the output stays for the answer
    # The model's defaults, else Qwen3's recommendation for thinking; logprobs 0: the chosen tokens' own, for the
    # confidence.
    params = seeds.sampling(
        request,
        **seeds.recommended(card),
        max_tokens=budget + ANSWER_TOKENS,
        logprobs=0,
        thinking_budget=budget,
    )
    return seeds.chat(card, seeds.user(body.question), params, think=True)


async def fold_thinking(events: AsyncIterator[Indexed]) -> tuple[Folded, list[float]]:
    """The answer, and the log-probabilities of its tokens: those from the first answer text on."""
    folded, answer_logprobs, answering = Folded(), [], False
    async for _, event in events:
        if isinstance(event, Done):
            folded.done = event
            continue
        folded.parts.append(event.text)
        folded.reasoning_parts.append(event.reasoning)
        answering = answering or bool(event.text)
        if answering:
            answer_logprobs += [item.logprob for item in event.logprobs or ()]
    return folded, answer_logprobs


def confidence(logprobs: list[float]) -> float:
    return round(math.exp(sum(logprobs) / len(logprobs)), 4) if logprobs else 0.0


async def thinking(request: Request) -> Response:
    body = await seeds.decode(request, thinking_decoder)
    generate = to_generate(request, body, seeds.served_model(request))
    started = time.perf_counter()
    events = open_events(request.app.state.pool, [generate], request.app.state.config.request_timeout)
    folded, logprobs = await until_disconnect(request, fold_thinking(events))
    return JSONBody(
        ThinkingResponse(
            answer=folded.text.strip(),
            reasoning=folded.reasoning.strip() if body.include_reasoning else None,
            confidence=confidence(logprobs),
            thinking_depth=body.thinking_depth,
            thinking_budget=generate.params.thinking_budget or 0,
            generation_time=round(time.perf_counter() - started, 4),
            usage=seeds.usage_of([folded.done]),
        )
    )


def _worker_seconds(done: Done | None) -> float:
    return round(done.timings.queue + done.timings.prefill + done.timings.decode, 4) if done else 0.0


async def batch_generate(request: Request) -> Response:
    body = await seeds.decode(request, batch_decoder)
    generates = [prompt_to_generate(request, body, prompt) for prompt in body.prompts]
    answers, seconds = await seeds.answer_all(request, generates)
    results = [
        GenerateResponse(
            generated_text=a.text,
            usage=seeds.usage_of([a.done]),
            model=generates[0].model,
            generation_time=_worker_seconds(a.done),
        )
        for a in answers
    ]
    return JSONBody(BatchGenerateResponse(results=results, batch_size=len(results), total_time=round(seconds, 4)))


def routes() -> list[BaseRoute]:
    return [
        Route("/thinking", thinking, methods=["POST"]),
        Route("/batch_generate", batch_generate, methods=["POST"]),
    ]
