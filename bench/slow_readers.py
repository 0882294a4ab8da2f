"""How much memory do clients that read slowly cost the gateway? 50 streams whose clients read about one token's
worth of bytes a second, while the model writes far faster; the gateway's RSS is sampled as they run.

The worker never waits for a reader (one slow client must not slow the batch), so what a client has not read yet
waits in the gateway. Each client's socket has a 4 KiB receive buffer, so the kernel cannot absorb the answer for
it and the gateway's own buffers are what is measured.

    .venv/bin/python bench/slow_readers.py [--root OTHER_CHECKOUT] [--clients 50] [--seconds 90]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx
from intake_stall import free_port, start_server
from machine import ROOT

PAGE = 4096


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def slow_client(port: int, model: str, max_tokens: int, stop: asyncio.Event) -> int:
    """One streamed chat read at ~300 bytes (about one SSE event) a second; the bytes it read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAGE)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=PAGE)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }).encode()  # fmt: skip
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    read = 0
    while not stop.is_set():
        chunk = await reader.read(300)
        if not chunk:
            break
        read += len(chunk)
        await asyncio.sleep(1.0)
    writer.close()
    return read


async def run(port: int, gateway_pid: int, clients: int, seconds: float, max_tokens: int) -> dict[str, object]:
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
    baseline = rss_bytes(gateway_pid)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(slow_client(port, model, max_tokens, stop)) for _ in range(clients)]
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(5)
        samples.append((round(time.monotonic() - started), rss_bytes(gateway_pid)))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    stop.set()
    read = await asyncio.gather(*tasks, return_exceptions=True)
    generated = sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tandem:generation_tokens_total")
    )
    return {
        "clients": clients,
        "seconds": seconds,
        "tokens_generated": int(generated),
        "bytes_read_by_clients": sum(r for r in read if isinstance(r, int)),
        "gateway_rss_mib": {
            "before": round(baseline / 2**20, 1),
            "peak": round(max(rss for _, rss in samples) / 2**20, 1),
            "end": round(samples[-1][1] / 2**20, 1),
        },
        "rss_mib_over_time": [(t, round(rss / 2**20, 1)) for t, rss in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose launcher to run")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--max-tokens", type=int, default=4000)
    args = parser.parse_args()
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="tandem-bench-")) / "server.log"
    process = start_server(args.root.resolve(), port, log, "--worker-arg=--max-running=64")
    try:
        gateway_pid = httpx.get(f"http://127.0.0.1:{port}/health").json().get("gateway_pid")
        if gateway_pid is None:  # an older tandem: the launcher's only python child that is not the worker
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
            gateway_pid = next(int(p) for p in children if b"gateway" in Path(f"/proc/{p}/cmdline").read_bytes())
        result = asyncio.run(run(port, gateway_pid, args.clients, args.seconds, args.max_tokens))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    print(json.dumps({"root": str(args.root), **result}, indent=2))


if __name__ == "__main__":
    main()
