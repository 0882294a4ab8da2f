"""The hand-written baseline: an OpenAI-style chat server around `model.generate` + TextIteratorStreamer, one at a time.

`python bench/baseline_generate.py --model FOLDER --port 8001`. Only what the load generator sends is understood:
messages, max_tokens, temperature, top_p, ignore_eos, stream, stream_options.include_usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, TextIteratorStreamer


class Abort(StoppingCriteria):
    """Set when the client goes away, so a disconnected request stops holding the model."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Baseline:
    def __init__(self, folder: str, dtype: torch.dtype) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.lock = asyncio.Lock()  # one generation at a time; the generating thread releases it when it ends

    async def generate(self, body: dict[str, Any]) -> AsyncIterator[str | dict[str, int]]:
        """Text pieces as the streamer yields them (about one word each), then a usage dict."""
        inputs = self.tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        max_tokens = int(body.get("max_tokens") or 256)
        temperature = float(body.get("temperature", 1.0))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        abort, usage = Abort(), {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": 0}
        kwargs = dict(
            **inputs,
            streamer=streamer,
            max_new_tokens=max_tokens,
            stopping_criteria=[abort],
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_p=float(body.get("top_p") or 1.0),
            min_new_tokens=max_tokens if body.get("ignore_eos") else None,
        )
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                output = self.model.generate(**kwargs)
                usage["completion_tokens"] = int(output.shape[1]) - usage["prompt_tokens"]
            finally:
                streamer.end()  # unblocks the reader even if generate raised
                loop.call_soon_threadsafe(self.lock.release)

        await self.lock.acquire()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()  # no await between acquire and start: the thread now owns the release
        try:
            while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
                if piece:
                    yield piece
            await asyncio.to_thread(thread.join)
            yield usage
        finally:
            abort.event.set()  # a no-op after a normal end; on a disconnect it ends generate at the next token


def chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return f"data: {json.dumps({**body, 'choices': [choice] if delta or finish else [], **extra})}\n\n"


async def chat_completions(request: Request) -> Response:
    baseline: Baseline = request.app.state.baseline
    body = await request.json()
    rid, model, max_tokens = f"chatcmpl-{uuid.uuid4().hex}", body.get("model", ""), body.get("max_tokens") or 256

    async def events() -> AsyncIterator[str]:
        yield chunk(rid, model, {"role": "assistant", "content": ""})
        async for piece in baseline.generate(body):
            if isinstance(piece, str):
                yield chunk(rid, model, {"content": piece})
                continue
            yield chunk(rid, model, {}, "length" if piece["completion_tokens"] >= max_tokens else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {**piece, "total_tokens": piece["prompt_tokens"] + piece["completion_tokens"]}
                yield chunk(rid, model, {}, usage=usage)
        yield "data: [DONE]\n\n"

    if body.get("stream"):
        return StreamingResponse(events(), media_type="text/event-stream")
    pieces = [p async for p in baseline.generate(body)]
    usage = pieces.pop() if pieces else {}
    message = {"role": "assistant", "content": "".join(str(p) for p in pieces)}
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion",
            "model": model,
            "usage": usage,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
    )


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a local Hugging Face folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    app = Starlette(
        routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/health", health)]
    )
    app.state.baseline = Baseline(args.model, getattr(torch, args.dtype))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
