"""`python bench/routing.py`: routing among several workers of one model (README, Cluster).

- cost: what choosing a worker costs the gateway per request (`routing_key` + `WorkerPool._pick`), in process, with
  64 requests in flight and the prefix tree full of multi-turn chats; cache-aware and least-loaded.
- chats: `launcher.py --workers 2`, multi-turn chats (each conversation opens with its own document, then asks
  follow-ups; every turn resends the whole conversation), once with `--routing cache_aware`, once `least_loaded`:
  the share of prompt tokens served from the prefix cache (the usage's `cached_tokens`) and TTFT of the follow-ups.
- failover: `--workers 2` under 8 streaming users, one worker SIGKILLed: how its requests end, whether any
  request sent after the kill fails, how long until the survivor serves alone, and until the dead one is back.
- throughput: output tokens/s with `--workers 1` and `--workers 2` at 16 users (distinct prompts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from load import WORDS, RequestRecord, Workload, percentile, request_body, run_level, stream_one
from run import RESULTS, ROOT, TANDEM_MODEL, free_port, stop, wait_ready

sys.path.insert(0, str(ROOT))
from common.protocol import ChatMessage, Generate, WorkerInfo  # noqa: E402
from gateway.connection import WorkerConnection  # noqa: E402
from gateway.routing import RoutingConfig, routing_key  # noqa: E402
from gateway.workers import WorkerPool  # noqa: E402

# -- the workload: conversations -------------------------------------------------------------


def conversation(rng: random.Random, serial: int, words: int) -> list[dict[str, str]]:
    document = " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"role": "user", "content": f"Document {serial}: {document}.\n\nSummarize the document in one line."}]


def follow_up(rng: random.Random) -> dict[str, str]:
    return {"role": "user", "content": f"Now say more about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."}


# -- cost ---------------------------------------------------------------------------------------


def cost(policy: str, num_workers: int, requests: int) -> dict[str, float]:
    """Microseconds per routing decision (key + pick), over `requests` turns of growing chats."""
    pool = WorkerPool([], routing=RoutingConfig(policy=policy))
    info = WorkerInfo(instance="i", pid=1, models=[], device="cpu", started_at=0, max_running=64, max_waiting=256)
    for i in range(num_workers):
        worker = WorkerConnection(f"tcp://10.0.0.{i}:5555", None, info=info, instance="i")  # type: ignore[arg-type]
        worker.queues = {j: None for j in range(64 // num_workers)}  # type: ignore[misc]  # 64 in flight in all
        pool.workers.append(worker)
    rng = random.Random(0)
    chats = [[ChatMessage(**m) for m in conversation(rng, i, 250)] for i in range(200)]
    times = []
    for n in range(requests):
        chat = chats[rng.randrange(len(chats))]
        chat.append(ChatMessage(role="assistant", content=" ".join(rng.choice(WORDS) for _ in range(30))))
        chat.append(ChatMessage(**follow_up(rng)))
        request = Generate(id=n, model="m", messages=chat)
        started = time.perf_counter()
        key = routing_key(request) if pool.router is not None else None
        pool._pick("m", pool.workers, key)
        times.append(time.perf_counter() - started)
        if len(chat) > 40:
            chat[1:] = []  # a new conversation in its place, as chats end
    pool.context.term()
    micro = [t * 1e6 for t in times]
    return {"p50_us": percentile(micro, 50) or 0, "p99_us": percentile(micro, 99) or 0, "max_us": max(micro)}


# -- servers ------------------------------------------------------------------------------------


class Tandem:
    def __init__(self, logs: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(ROOT / "launcher.py"), "--port", str(self.port), "--no-embedding-model"]
        command += ["--worker-arg=--kv-cache-bytes=536870912", *flags]
        self.out = (logs / f"{name}.log").open("wb")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)

    def wait(self, workers: int) -> None:
        wait_ready(self.process, self.url, 300)
        deadline = time.monotonic() + 300
        while len(self.ready()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("workers not ready")
            time.sleep(0.5)

    def ready(self) -> list[dict[str, Any]]:
        try:
            return [w for w in httpx.get(f"{self.url}/health", timeout=5).json()["workers"] if w["ready"]]
        except (httpx.HTTPError, ValueError, KeyError):
            return []

    def stop(self) -> None:
        stop(self.process)
        self.out.close()


# -- chats --------------------------------------------------------------------------------------


async def chat_user(url: str, user: int, args: argparse.Namespace, records: list[tuple[int, RequestRecord]]) -> None:
    """`args.open` conversations at once, their turns taken in rotation (a user with several chat tabs, or a service
    with many sessions): the workers' caches must hold every open conversation, which is where routing matters."""
    rng = random.Random(f"user-{user}")
    workload = Workload(url=url, model=TANDEM_MODEL, max_tokens=args.max_tokens)
    async with httpx.AsyncClient(timeout=600) as client:
        for batch in range(args.conversations // (args.users * args.open)):
            serials = [user * 1000 + batch * args.open + c for c in range(args.open)]
            open_chats = [conversation(rng, serial, args.document_words) for serial in serials]
            for turn in range(args.turns):
                for c, messages in enumerate(open_chats):
                    record = RequestRecord(start=time.perf_counter())
                    await stream_one(client, workload, request_body(workload, messages), record, 0.0)
                    records.append((turn, record))
                    open_chats[c] = [*messages, {"role": "assistant", "content": answer(record, rng)}, follow_up(rng)]


def answer(record: RequestRecord, rng: random.Random) -> str:
    # The client resends the assistant's answer; its exact text does not change the prefix the worker cached for
    # the earlier turns (the template renders the answer after them), so any text of about its length will do.
    return " ".join(rng.choice(WORDS) for _ in range(record.output_tokens))


def chats(policy: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    kv = f"--worker-arg=--kv-cache-bytes={args.chat_kv_mib << 20}"
    server = Tandem(logs, f"chats-{policy}", "--workers", "2", f"--gateway-arg=--routing={policy}", kv)
    try:
        server.wait(2)
        records: list[tuple[int, RequestRecord]] = []
        started = time.perf_counter()

        async def everyone() -> None:
            await asyncio.gather(*(chat_user(server.url, u, args, records) for u in range(args.users)))

        asyncio.run(everyone())
        wall = time.perf_counter() - started
        health = httpx.get(f"{server.url}/health", timeout=5).json()["workers"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    finally:
        server.stop()
    follow = [r for turn, r in records if turn > 0]
    ttft = [r.first_token - r.start for r in follow if r.first_token is not None]
    decisions = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("tandem:routing_decisions_total{")
    }
    return {
        "requests": len(records),
        "hit_rate": ratio([r for _, r in records]),
        "follow_up_hit_rate": ratio(follow),
        "ttft_p50_ms": 1000 * (percentile(ttft, 50) or 0),
        "ttft_p95_ms": 1000 * (percentile(ttft, 95) or 0),
        "wall_s": wall,
        "workers_hit_rate": [w["prefix_cache_hit_rate"] for w in health],
        "decisions": decisions,
    }


def ratio(records: list[RequestRecord]) -> float:
    """Prompt tokens the server reported cached, over all prompt tokens."""
    return sum(r.cached_tokens or 0 for r in records) / max(sum(r.prompt_tokens or 0 for r in records), 1)


# -- failover -----------------------------------------------------------------------------------


def failover(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    server = Tandem(logs, "failover", "--workers", "2")
    try:
        server.wait(2)
        victim = server.ready()[0]["pid"]
        workload = Workload(url=server.url, model=TANDEM_MODEL, max_tokens=64)
        outcomes: list[tuple[float, float, str]] = []  # (start, end, "done" | error)
        killed = [0.0]

        async def user(u: int, until: float) -> None:
            rng = random.Random(u)
            async with httpx.AsyncClient(timeout=120) as client:
                while time.perf_counter() < until:
                    record = RequestRecord(start=time.perf_counter())
                    body = request_body(workload, conversation(rng, u, 60))
                    try:
                        await stream_one(client, workload, body, record, 0.0)
                        outcomes.append((record.start, time.perf_counter(), "done"))
                    except (httpx.HTTPError, RuntimeError) as exc:
                        outcomes.append((record.start, time.perf_counter(), str(exc)[:80]))

        async def run() -> None:
            until = time.perf_counter() + 15
            users = [asyncio.create_task(user(u, until)) for u in range(8)]
            await asyncio.sleep(5)
            os.kill(victim, signal.SIGKILL)
            killed[0] = time.perf_counter()
            await asyncio.gather(*users)

        asyncio.run(run())
        kill = killed[0]
        while len(ready := server.ready()) < 2 or victim in {w["pid"] for w in ready}:
            time.sleep(0.2)
        back = time.perf_counter() - kill
    finally:
        server.stop()
    cut = [end - kill for start, end, how in outcomes if start < kill < end and how != "done"]
    after = [(start, end, how) for start, end, how in outcomes if start >= kill]
    first_ok = min((end for start, end, how in after if how == "done"), default=None)
    return {
        "in_flight_failed": len(cut),
        "to_error_p50_s": statistics.median(cut) if cut else None,
        "to_error_max_s": max(cut) if cut else None,
        "sent_after_kill": len(after),
        "failed_after_kill": sum(1 for *_, how in after if how != "done"),
        "first_success_after_kill_s": None if first_ok is None else first_ok - kill,
        "worker_back_s": back,
    }


# -- throughput ---------------------------------------------------------------------------------


def throughput(workers: int, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    server = Tandem(logs, f"throughput-{workers}", "--workers", str(workers))
    try:
        server.wait(workers)
        workload = Workload(url=server.url, model=TANDEM_MODEL, max_tokens=64)
        result = asyncio.run(run_level(workload, args.throughput_users, args.duration, warmup=5.0))
    finally:
        server.stop()
    return {"tok_s": result.tokens_per_s, "ttft_p50_ms": 1000 * (result.ttft_p50 or 0), "errors": result.errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["cost", "chats", "failover", "throughput"])
    parser.add_argument("--users", type=int, default=4, help="chats: concurrent users, one conversation at a time")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--open", type=int, default=4, help="chats: conversations each user keeps open at once")
    parser.add_argument(
        "--chat-kv-mib",
        type=int,
        default=144,
        help="chats: each worker's KV cache (144 MiB: ~6,500 tokens, room for every open conversation once, not twice)",
    )
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--document-words", type=int, default=250)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--throughput-users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    logs = RESULTS / f"logs-routing-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if "cost" in args.parts:
        print("\n| policy | workers | in flight | routing p50 µs | p99 µs | max µs |\n|---|---:|---:|---:|---:|---:|")
        for policy in ("cache_aware", "least_loaded"):
            for workers in (2, 8):
                c = cost(policy, workers, 20_000)
                print(f"| {policy} | {workers} | 64 | {c['p50_us']:.1f} | {c['p99_us']:.1f} | {c['max_us']:.0f} |")
    if "chats" in args.parts:
        results = {policy: chats(policy, args, logs) for policy in ("cache_aware", "least_loaded")}
        print(
            f"\n{args.conversations} conversations × {args.turns} turns, {args.users} users, {args.open} open each, "
            f"2 workers of {args.chat_kv_mib} MiB KV"
        )
        print("| routing | prefix-cache hit rate (all / follow-ups) | per worker | follow-up TTFT p50 / p95 ms | "
              "wall s | decisions |\n|---|---:|---|---:|---:|---|")  # fmt: skip
        for policy, r in results.items():
            print(
                f"| {policy} | {r['hit_rate']:.1%} / {r['follow_up_hit_rate']:.1%} | "
                f"{', '.join(f'{h:.1%}' for h in r['workers_hit_rate'])} | {r['ttft_p50_ms']:.0f} / "
                f"{r['ttft_p95_ms']:.0f} | {r['wall_s']:.1f} | {r['decisions']} |",
                flush=True,
            )
    if "failover" in args.parts:
        print(f"\nfailover: {failover(args, logs)}", flush=True)
    if "throughput" in args.parts:
        one, two = throughput(1, args, logs), throughput(2, args, logs)
        print(f"\n| workers | tok/s at {args.throughput_users} users | TTFT p50 ms |\n|---:|---:|---:|")
        for n, r in ((1, one), (2, two)):
            print(f"| {n} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | (errors {r['errors']})")
    print(f"\nlogs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
