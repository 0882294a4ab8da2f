"""What a router in front of tandem reads to learn a server's model: SGLang's `/server_info` and `/model_info`
(and their older `/get_` names), in the shape sglang-router (0.3.x) parses.

sglang-router names a worker's model from `served_model_name`, else `model_path` (the whole string), else
"unknown"; a field of the wrong JSON type makes it drop the whole answer, and `model` is an alias of
`model_id` there, so the two are never sent together. One tandem server stands behind a router as one model
server, whatever number of workers its gateway holds: the gateway balances those itself, so `dp_size` is 1
and a router started with `--dp-aware` does not split tandem into ranks.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from common.protocol import ModelCard
from gateway.errors import Unavailable
from gateway.workers import WorkerPool


def served_card(pool: WorkerPool) -> ModelCard:
    """The model a router should list for this server: the first one a ready worker serves. A router keeps one
    model per server, so a server that holds several shows only this one there (they all stay reachable by
    name through the proxied OpenAI routes)."""
    cards = pool.models()
    if not cards:
        raise Unavailable("No model worker is ready yet; try again shortly", headers={"Retry-After": "1"})
    return cards[0]


def server_info(pool: WorkerPool, version: str) -> dict[str, Any]:
    card = served_card(pool)
    infos = [worker.info for worker in pool.workers if worker.is_ready and worker.info is not None]
    return {
        "model_path": card.name,
        "served_model_name": card.name,
        "tokenizer_path": card.name,  # the worker tokenizes with the model's own tokenizer
        "tp_size": 1,
        "dp_size": 1,
        "context_length": card.context_length,
        "max_running_requests": sum(info.max_running for info in infos),
        "version": version,
        "models": [c.name for c in pool.models()],  # tandem's own: every model this server serves
    }


def model_info(pool: WorkerPool) -> dict[str, Any]:
    card = served_card(pool)
    return {
        "model_path": card.name,
        "tokenizer_path": card.name,
        "is_generation": True,  # tandem serves generative models only
        "model_type": card.architecture or None,  # the Hugging Face config's model_type, e.g. "llama"
        "context_length": card.context_length,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }


async def server_info_endpoint(request: Request) -> Response:
    return JSONResponse(server_info(request.app.state.pool, request.app.state.config.version))


async def model_info_endpoint(request: Request) -> Response:
    return JSONResponse(model_info(request.app.state.pool))


def routes() -> list[BaseRoute]:
    return [
        Route("/server_info", server_info_endpoint, methods=["GET"]),
        Route("/get_server_info", server_info_endpoint, methods=["GET"]),  # SGLang's older name, still read
        Route("/model_info", model_info_endpoint, methods=["GET"]),
        Route("/get_model_info", model_info_endpoint, methods=["GET"]),
    ]
