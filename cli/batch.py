"""`python launcher.py batch INPUT.jsonl OUTPUT.jsonl`: a file in OpenAI's Batch format through the engine, as
vLLM's run_batch does, for offline jobs over thousands of prompts.

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" |
"/v1/embeddings", "body"}`;
each output line is what OpenAI writes: `{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}`, in the order the answers finish (match them by custom_id, as with OpenAI). Requests go out concurrently,
up to --concurrency at once, so the engine batches them. Without --url a server of its own is started (the
launcher's worker and gateway, on a free port) and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx
from tqdm import tqdm

logger = logging.getLogger("batch")

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
HERE = Path(__file__).resolve().parents[1]


def failed(custom_id: Any, message: str, code: str = "invalid_request") -> dict[str, Any]:
    """A line that got no answer from the server: no response, an error (OpenAI's shape for it)."""
    return {"id": _id(), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def _id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def check(line: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the request, None), or (None, the error line to write)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, failed(None, f"the line is not JSON: {exc}")
    if not isinstance(request, dict):
        return None, failed(None, "the line is not a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str):
        return None, failed(custom_id, "custom_id must be a string")
    if request.get("method") != "POST" or request.get("url") not in URLS:
        return None, failed(custom_id, f"method must be POST and url one of {', '.join(URLS)}")
    body = request.get("body")
    if not isinstance(body, dict):
        return None, failed(custom_id, "body must be a JSON object")
    if body.get("stream"):
        return None, failed(custom_id, "stream is not supported in a batch")
    return request, None


async def answer(client: httpx.AsyncClient, line: str) -> dict[str, Any]:
    request, error = check(line)
    if request is None:
        assert error is not None
        return error
    try:
        response = await client.post(request["url"], json=request["body"])
    except httpx.HTTPError as exc:
        return failed(request["custom_id"], f"the server could not be reached: {exc!r}", "server_unreachable")
    return {
        "id": _id(),
        "custom_id": request["custom_id"],
        "response": {
            "status_code": response.status_code,
            "request_id": response.headers.get("x-request-id", ""),
            "body": response.json(),
        },
        "error": None,
    }


async def run_batch(lines: list[str], client: httpx.AsyncClient, out: TextIO, *, concurrency: int) -> int:
    """Answer every line, writing each answer as it finishes; returns how many got a 200."""
    slots = asyncio.Semaphore(concurrency)
    succeeded = 0
    with tqdm(total=len(lines), unit="req", desc="batch", file=sys.stderr) as progress:

        async def one(line: str) -> None:
            nonlocal succeeded
            async with slots:
                result = await answer(client, line)
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
            succeeded += bool(result["response"] and result["response"]["status_code"] == 200)
            progress.update(1)

        await asyncio.gather(*(one(line) for line in lines))
    return succeeded


# -- a server of its own ------------------------------------------------------------------------


@contextmanager
def own_server(launcher_args: list[str], timeout: float = 300) -> Iterator[str]:
    """The launcher on a free loopback port, until the batch is done; its log in a file, not over the progress bar."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(HERE / "launcher.py"), "--port", str(port), *launcher_args]
    with tempfile.NamedTemporaryFile("w+", prefix="tandem-batch-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        logger.info("starting a server for this batch (log: %s)", log.name)
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the server did not start:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python launcher.py batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("input", type=Path, help="requests, one JSON object a line")
    parser.add_argument("output", type=Path, help="answers, one JSON object a line")
    parser.add_argument("--url", help="a running tandem (default: start one for this batch)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at once")
    parser.add_argument("--model", help="the model a server of its own serves (default: the launcher's)")
    parser.add_argument("--launcher-arg", action="append", default=[], help="extra flag for a server of its own")
    args = parser.parse_args(argv)
    lines = [line for line in args.input.read_text().splitlines() if line.strip()]
    launcher_args = [*(["--model", args.model] if args.model else []), *args.launcher_arg]

    async def go(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=None) as client:
            with args.output.open("w") as out:
                return await run_batch(lines, client, out, concurrency=args.concurrency)

    if args.url:
        succeeded = asyncio.run(go(args.url.rstrip("/")))
    else:
        with own_server(launcher_args) as url:
            succeeded = asyncio.run(go(url))
    logger.info("%d of %d requests answered 200; answers in %s", succeeded, len(lines), args.output)
    return 0
