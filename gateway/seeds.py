"""What the seed services' dialects share: FastAPI's error shape, the served model, sampling, one-prompt answers.

The seeds (`../shared/seeds/`) were FastAPI apps, so their clients read errors as FastAPI writes them:
`{"detail": "…"}`, and 422 with `{"detail": [{"type", "loc", "msg"}]}` for a body that does not fit.
Their requests name no model: each seed served one, so these routes serve the first model the pool holds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import JSONResponse

from common.protocol import ChatMessage, Done, Generate, ModelCard, SamplingParams, WorkerInfo
from gateway.errors import BadRequest, GatewayError, InvalidBody, Unavailable
from gateway.streaming import Folded, decode_body, fold_until_disconnect, open_events
from gateway.workers import model_key

T = TypeVar("T")

NonEmpty = Annotated[str, Meta(min_length=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]  # seed 003's documented range
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Sampling(Struct, kw_only=True):
    """The generation fields of seeds 001 and 003: 001 passed `max_length` and `do_sample` to transformers'
    generate (max_length: prompt and output together), 003 took `max_tokens` (output only, 1–4096)."""

    max_tokens: Annotated[int, Meta(ge=1, le=4096)] | None = None
    max_length: PositiveInt | None = None
    temperature: Temperature = 0.7
    top_p: Probability = 0.9
    do_sample: bool = True  # False: greedy, whatever the temperature


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DEFAULT_MAX_TOKENS = 512  # seed 003's recommended max_tokens for questions and answers


class Detail(Struct):
    """An error as FastAPI writes it: a message, or for an invalid body the list of what is wrong."""

    detail: str | list[dict[str, Any]]


# -- errors -------------------------------------------------------------------------------------


async def decode(request: Request, decoder: msgspec.json.Decoder[T]) -> T:
    """The shared body reader, with FastAPI's 422 for a body that is not JSON or does not fit the route."""
    try:
        return await decode_body(request, decoder)
    except BadRequest as exc:
        raise InvalidBody(exc.message, param=exc.param) from None


def render_error(exc: GatewayError) -> JSONResponse:
    detail: str | list[dict[str, Any]] = exc.message
    if isinstance(exc, InvalidBody):
        detail = [problem(exc)]
    return JSONResponse({"detail": detail}, status_code=exc.status, headers=exc.headers)


_MISSING = re.compile(r"missing required field `([^`]+)`")
_INDEX = re.compile(r"\[(\d+)\]")


def problem(exc: InvalidBody) -> dict[str, Any]:
    """One entry of FastAPI's 422 list; `loc` from the path msgspec names (`messages[0].role`)."""
    if exc.message.startswith("Request body is not valid JSON"):
        return {"type": "json_invalid", "loc": ["body"], "msg": exc.message}
    loc: list[str | int] = ["body"]
    for part in (exc.param or "").split("."):
        name, *indexes = _INDEX.split(part)
        loc += [name] if name else []
        loc += [int(i) for i in indexes if i]
    if _MISSING.search(exc.message):
        return {"type": "missing", "loc": loc, "msg": "Field required"}
    return {"type": "value_error", "loc": loc, "msg": exc.message}


def has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


# -- the model and the answer -------------------------------------------------------------------


def served_model(request: Request) -> ModelCard:
    """The model behind the seed routes: the pool's first. 503 until one is loaded, as the seeds answered."""
    pool = request.app.state.pool
    models = pool.models() if pool.is_ready else []
    if not models:
        raise Unavailable("The model is not loaded yet; try again shortly", headers={"Retry-After": "1"})
    card: ModelCard = models[0]
    return card


def worker_info(request: Request, card: ModelCard) -> WorkerInfo | None:
    """What the ready worker serving `card` now says about itself (device, memory, its card), for the info routes;
    None when none does: with the supervisor's registry a model is listed before it loads and after keep_alive
    unloads it."""
    for worker in request.app.state.pool.workers:
        info: WorkerInfo | None = worker.info
        if worker.is_ready and not worker.draining and info is not None and served_card(info, card) is not None:
            return info
    return None


def served_card(info: WorkerInfo | None, card: ModelCard) -> ModelCard | None:
    """The worker's own card of `card`'s model (its weights as loaded), None if that worker does not serve it."""
    models = info.models if info is not None else []
    return next((m for m in models if model_key(m.name) == model_key(card.name)), None)


def sampling(
    request: Request,
    *,
    temperature: float,
    top_p: float,
    max_tokens: int | None = None,
    max_length: int | None = None,
    **more: Any,
) -> SamplingParams:
    """`max_tokens` counts output only; `max_length` is Hugging Face's (prompt and output, capped in the worker).
    Both stay under the gateway's --seed-max-tokens, where set."""
    cap: int | None = request.app.state.config.seed_max_tokens
    limit = min(max_tokens, cap) if max_tokens and cap else max_tokens or cap
    return SamplingParams(temperature=temperature, top_p=top_p, max_tokens=limit, max_total_tokens=max_length, **more)


def recommended(card: ModelCard) -> dict[str, Any]:
    """For routes whose bodies carry no sampling fields (000's chat, 001's /thinking): the model's own defaults
    (its generation_config.json or --param), else Qwen3's recommendation for thinking, which the seeds served."""
    defaults = card.defaults
    return {
        "temperature": 0.6 if defaults.temperature is None else defaults.temperature,
        "top_p": 0.95 if defaults.top_p is None else defaults.top_p,
        "top_k": 20 if defaults.top_k is None else defaults.top_k,
    }


def params_of(request: Request, body: Sampling) -> SamplingParams:
    max_tokens = body.max_tokens or (None if body.max_length else DEFAULT_MAX_TOKENS)
    temperature = body.temperature if body.do_sample else 0.0
    return sampling(
        request, temperature=temperature, top_p=body.top_p, max_tokens=max_tokens, max_length=body.max_length
    )


def chat(card: ModelCard, messages: list[ChatMessage], params: SamplingParams, **more: Any) -> Generate:
    return Generate(id=0, model=card.name, params=params, messages=messages, **more)


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


@dataclass(frozen=True)
class Answer:
    """One folded answer and what the seeds report about it."""

    folded: Folded
    seconds: float

    @property
    def text(self) -> str:
        return self.folded.text

    @property
    def usage(self) -> Usage:
        return usage_of([self.folded.done])


def usage_of(dones: Iterable[Done | None]) -> Usage:
    counts = [done.usage for done in dones if done is not None]
    prompt, completion = sum(u.prompt_tokens for u in counts), sum(u.completion_tokens for u in counts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def answer_all(request: Request, generates: list[Generate]) -> tuple[list[Folded], float]:
    """Every request sent to the engine at once (one batch, not a loop), folded; stops if the client leaves."""
    started = time.perf_counter()
    events = open_events(request.app.state.pool, generates, request.app.state.config.request_timeout)
    folded = await fold_until_disconnect(request, events, len(generates))
    return folded, time.perf_counter() - started


async def answer(request: Request, generate: Generate) -> Answer:
    [folded], seconds = await answer_all(request, [generate])
    return Answer(folded, seconds)
