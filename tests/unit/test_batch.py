"""`launcher.py batch` without a model: OpenAI Batch lines in, OpenAI's answer lines out, all requests in flight at
once, bad lines answered with an error line instead of stopping the job."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import pytest
from fake_pool import ScriptedPool
from test_models_api import ENCODER, pool_for
from test_seeds import CARD, BarrierPool

from cli.batch import run_batch
from gateway.app import create_app
from gateway.config import GatewayConfig

pytestmark = pytest.mark.anyio

CHAT = {"model": CARD.name, "messages": [{"role": "user", "content": "a"}], "max_tokens": 4}


def line(custom_id: str, url: str = "/v1/chat/completions", body: Any = CHAT, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


async def run(lines: list[str], pool: ScriptedPool, concurrency: int = 8) -> tuple[int, dict[str, Any]]:
    app = create_app(GatewayConfig(workers=()), pool=pool)  # type: ignore[arg-type]
    out = io.StringIO()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem") as client:
            succeeded = await asyncio.wait_for(run_batch(lines, client, out, concurrency=concurrency), 10)
    answers = [json.loads(text) for text in out.getvalue().splitlines()]
    assert len(answers) == len(lines)
    return succeeded, {answer["custom_id"]: answer for answer in answers}


async def test_answer_lines_are_openais_and_every_request_is_in_flight_at_once() -> None:
    completion = {"model": CARD.name, "prompt": "b", "max_tokens": 4}
    lines = [line("chat-1"), line("text-1", "/v1/completions", completion), line("chat-2")]
    succeeded, answers = await run(lines, BarrierPool(size=3))  # the pool answers once all three are in
    assert succeeded == 3
    chat = answers["chat-1"]
    assert chat["id"].startswith("batch_req_") and chat["error"] is None
    assert chat["response"]["status_code"] == 200 and chat["response"]["request_id"]
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert chat["response"]["body"]["choices"][0]["message"]["content"] == "a"
    assert answers["text-1"]["response"]["body"]["choices"][0]["text"] == "b"


async def test_bad_lines_get_an_error_line_and_the_job_goes_on() -> None:
    lines = [
        "not json",
        line("wrong-url", "/v1/moderations"),
        line("wrong-method", method="GET"),
        line("streamed", body={**CHAT, "stream": True}),
        line("unknown-model", body={**CHAT, "model": "nope"}),
        line("fine"),
    ]
    succeeded, answers = await run(lines, BarrierPool(size=1), concurrency=1)
    assert succeeded == 1
    for custom_id in (None, "wrong-url", "wrong-method", "streamed"):
        assert answers[custom_id]["response"] is None and answers[custom_id]["error"]["code"] == "invalid_request"
    refused = answers["unknown-model"]["response"]  # the server answered: OpenAI writes its status and error body
    assert refused["status_code"] == 404 and refused["body"]["error"]["code"] == "model_not_found"
    assert answers["unknown-model"]["error"] is None


async def test_embedding_lines_answer_openais_embedding_body() -> None:
    """OpenAI's Batch API and vLLM's run_batch take /v1/embeddings lines too."""
    body = {"model": ENCODER.name, "input": ["one", "two"]}
    succeeded, answers = await run([line("emb-1", "/v1/embeddings", body)], pool_for(ENCODER))
    assert succeeded == 1
    embedded = answers["emb-1"]
    assert embedded["id"].startswith("batch_req_") and embedded["error"] is None
    assert embedded["response"]["status_code"] == 200 and embedded["response"]["request_id"]
    answer = embedded["response"]["body"]
    assert answer["object"] == "list" and answer["model"] == ENCODER.name
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert answer["data"][0]["embedding"] == [0.5, 0.5, 0.5, 0.5]
