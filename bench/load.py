"""Closed-loop load generator: N users stream OpenAI chat completions back to back; per-level throughput, latency.

Each level runs a warm-up, then a measurement window of fixed length (or a fixed request count). Only what happens
inside the window counts: tokens that arrived in it, requests that finished in it, first tokens that arrived in it,
and gaps between chunks that ended in it. A slow server is thus neither flattered nor punished by how its last
requests drain. Requests still open when the window closes are cancelled (the client disconnects, as users do); one
that had not produced its first token by then counts with its wait so far as a lower bound on its TTFT (printed "≥").
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# Short, common English words: each is one token (with its leading space) in most BPE vocabularies, so the prompt
# length in tokens is predictable without a tokenizer on the client side.
WORDS = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city name team minute idea kid body back "
    "parent face others level office door health person art war history party result change morning reason "
    "research girl guy moment air teacher force education foot boy age policy music market sense nation plan "
    "college interest death experience effect class control care field development role effort rate heart drug "
    "show leader light voice wife police mind price report decision son view relationship town road arm "
    "difference value building action model season society tax director position player record paper space "
    "ground form event official matter center couple site project activity star table need court oil situation"
).split()

# SmolLM2's template adds its default system prompt (~30 tokens with the chat markup) when none is given, as it
# would for a real client; 110 words plus the instruction make ~160 prompt tokens in all (measured with its tokenizer).
DEFAULT_PROMPT_WORDS = 110


@dataclass(frozen=True)
class Workload:
    url: str  # server root, e.g. http://127.0.0.1:8000
    model: str
    max_tokens: int = 64
    prompt_words: int = DEFAULT_PROMPT_WORDS
    system_words: int = 0  # > 0: every request starts with the same system message of this many words
    ignore_eos: bool = True  # send vLLM's `ignore_eos` so every request decodes exactly max_tokens
    temperature: float = 1.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # server-specific fields, merged last
    seed: int = 0


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds on the level's clock (0 = level start)."""

    start: float
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    output_tokens: int = 0  # from `usage` when the server sends it, else the content chunk count
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the server says it served from its prefix cache
    usage_tokens: int | None = None
    saw_done: bool = False
    error: str | None = None


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    window_s: float
    output_tokens: int  # tokens that arrived inside the window
    level_output_tokens: int  # tokens that arrived at any time during the level, warm-up included
    tokens_per_s: float
    completed: int
    errors: int
    cancelled: int  # still running when the window closed
    short: int  # completed with fewer tokens than max_tokens (a finding when the server was told to ignore EOS)
    no_done: int  # completed streams that ended without `data: [DONE]` (truncated, or a server that omits it)
    chunk_mismatch: int  # completed requests whose usage count differs from their content chunk count
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_censored: int  # requests with no token by the end of the window: their wait is a lower bound
    itl_p50: float | None
    itl_p95: float | None
    tpot_p50: float | None  # per request: (last token - first token) / (tokens - 1); blind to chunking
    mean_prompt_tokens: float | None
    prefix_hit_rate: float | None  # cached prompt tokens over all prompt tokens, where the server reports them
    error_samples: list[str]


def make_prompt(rng: random.Random, serial: str, words: int, system_words: int = 0) -> list[dict[str, str]]:
    """A distinct user message per request, after a system message every request shares (the template's default
    one when `system_words` is 0), as a chat UI's system prompt or an agent's instructions make."""
    notes = " ".join(rng.choice(WORDS) for _ in range(words))
    # The serial goes last: first, a user's successive serials (100000, 100001, ...) shared their leading digits, and
    # with the template's system prompt that made a second 16-token block shared (prefix hit rate 0.18 instead of
    # the system prompt's 0.10 at 4-64 users).
    text = f"{notes.capitalize()}.\n\nWrite a short story that uses the words in the note above (note {serial})."
    messages = [{"role": "user", "content": text}]
    if system_words:
        messages.insert(0, {"role": "system", "content": system_message(system_words)})
    return messages


@functools.cache
def system_message(words: int) -> str:
    """The same text for every user and request, built once."""
    shared = random.Random("system")
    return f"You are a storyteller. House vocabulary: {' '.join(shared.choice(WORDS) for _ in range(words))}."


def request_body(workload: Workload, messages: list[dict[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": workload.model,
        "messages": messages,
        "max_tokens": workload.max_tokens,
        "temperature": workload.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if workload.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **workload.extra_body}


async def stream_one(
    client: httpx.AsyncClient, workload: Workload, body: dict[str, Any], record: RequestRecord, clock: float
) -> None:
    """Send one streamed request and fill `record` as chunks arrive (so a cancelled request keeps what it got)."""
    async with client.stream("POST", f"{workload.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                record.saw_done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {json.dumps(chunk['error'])[:200]}")
            now = time.perf_counter() - clock
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    record.first_token = record.first_token if record.first_token is not None else now
                    record.token_times.append(now)
            if chunk.get("usage"):
                record.usage_tokens = chunk["usage"].get("completion_tokens")
                record.prompt_tokens = chunk["usage"].get("prompt_tokens")
                details = chunk["usage"].get("prompt_tokens_details") or {}
                record.cached_tokens = details.get("cached_tokens")
    record.end = time.perf_counter() - clock
    record.output_tokens = record.usage_tokens if record.usage_tokens is not None else len(record.token_times)


async def user_loop(
    client: httpx.AsyncClient,
    workload: Workload,
    user: int,
    clock: float,
    deadline: float,
    budget: list[int],
    records: list[RequestRecord],
    level: int = 0,
) -> None:
    """One closed-loop user: the next request starts as soon as the previous one ends.

    Prompts are distinct across users and across levels: each level's users draw from their own seeds, because the
    levels of one run share a server, and a prompt repeated from an earlier level would be a prefix-cache hit
    (measured: a third of the prompt tokens at 4-64 users when every level replayed the same users' prompts)."""
    rng = random.Random(f"{workload.seed}-{level}-{user}")
    serial = 0
    while time.perf_counter() - clock < deadline and budget[0] > 0:
        budget[0] -= 1
        record = RequestRecord(start=time.perf_counter() - clock)
        records.append(record)
        messages = make_prompt(rng, f"{level}-{user * 100_000 + serial}", workload.prompt_words, workload.system_words)
        body = request_body(workload, messages)
        serial += 1
        try:
            await stream_one(client, workload, body, record, clock)
        except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:300]
            record.end = time.perf_counter() - clock
            await asyncio.sleep(0.1)  # a failing server must not turn the loop into a busy spin


async def run_level(
    workload: Workload,
    concurrency: int,
    duration: float = math.inf,
    *,
    warmup: float = 0.0,
    max_requests: int | None = None,
    request_timeout: float = 900.0,
) -> LevelResult:
    """`concurrency` users for `warmup` + `duration` seconds, measured over the last `duration` seconds.

    With `max_requests` the level ends early once that many requests have run; with only `max_requests` (an
    infinite duration) it ends when the last of them does, and all of it is measured (`warmup` is then ignored).
    """
    records: list[RequestRecord] = []
    budget = [max_requests if max_requests is not None else sys.maxsize]
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        clock = time.perf_counter()
        deadline = warmup + duration if math.isfinite(duration) else math.inf
        users = [
            asyncio.create_task(user_loop(client, workload, u, clock, deadline, budget, records, concurrency))
            for u in range(concurrency)
        ]
        _, pending = await asyncio.wait(users, timeout=None if math.isinf(deadline) else deadline)
        end = time.perf_counter() - clock
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # closes their connections: the server sees aborts
    # A level bounded only by its request count has no warm-up to skip: all of it is measured.
    return summarize(records, concurrency, warmup if math.isfinite(duration) else 0.0, end, workload)


def summarize(
    records: list[RequestRecord], concurrency: int, start: float, end: float, workload: Workload
) -> LevelResult:
    """Everything over the window [start, end] of the level's clock."""

    def inside(t: float | None) -> bool:
        return t is not None and start <= t <= end

    window = end - start
    finished = [r for r in records if inside(r.end) and r.error is None]
    errored = [r for r in records if r.error is not None]  # any time: errors are findings, warm-up or not
    open_ = [r for r in records if r.error is None and (r.end is None or r.end > end)]
    tokens = sum(sum(1 for t in r.token_times if inside(t)) for r in records)
    # Usage counts tokens the chunks may have merged (a word, a held-back UTF-8 byte): credit them at the end.
    tokens += sum(max(r.output_tokens - len(r.token_times), 0) for r in finished)
    ttfts = [r.first_token - r.start for r in records if r.first_token is not None and inside(r.first_token)]
    censored = [end - r.start for r in open_ if r.first_token is None or r.first_token > end]
    gaps = [b - a for r in records for a, b in zip(r.token_times, r.token_times[1:], strict=False) if inside(b)]
    tpots = [
        (r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1)
        for r in finished
        if r.output_tokens > 1 and len(r.token_times) > 1
    ]
    prompts = [r.prompt_tokens for r in finished if r.prompt_tokens is not None]
    cached = [(r.cached_tokens, r.prompt_tokens) for r in finished if r.cached_tokens is not None and r.prompt_tokens]
    all_tokens = sum(max(r.output_tokens, len(r.token_times)) for r in records)
    return LevelResult(
        concurrency=concurrency,
        window_s=round(window, 3),
        output_tokens=tokens,
        level_output_tokens=all_tokens,
        tokens_per_s=tokens / window if window > 0 else 0.0,
        completed=len(finished),
        errors=len(errored),
        cancelled=len(open_),
        short=sum(1 for r in finished if r.output_tokens < workload.max_tokens),
        no_done=sum(1 for r in finished if not r.saw_done),
        chunk_mismatch=sum(1 for r in finished if r.usage_tokens is not None and r.usage_tokens != len(r.token_times)),
        ttft_p50=percentile(ttfts + censored, 50),
        ttft_p95=percentile(ttfts + censored, 95),
        ttft_censored=len(censored),
        itl_p50=percentile(gaps, 50),
        itl_p95=percentile(gaps, 95),
        tpot_p50=percentile(tpots, 50),
        mean_prompt_tokens=sum(prompts) / len(prompts) if prompts else None,
        prefix_hit_rate=sum(c for c, _ in cached) / sum(p for _, p in cached) if cached else None,
        error_samples=sorted({r.error for r in errored if r.error})[:5],
    )


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def format_level(result: LevelResult) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}ms"

    lower = "≥" if result.ttft_censored else ""
    return (
        f"c={result.concurrency:<3} {result.tokens_per_s:8.1f} tok/s  TTFT p50 {lower}{ms(result.ttft_p50)} "
        f"p95 {lower}{ms(result.ttft_p95)}  ITL p50 {ms(result.itl_p50)} p95 {ms(result.itl_p95)}  "
        f"done {result.completed} err {result.errors} open {result.cancelled} short {result.short} "
        f"chunks≠usage {result.chunk_mismatch} no-[DONE] {result.no_done}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/load.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per level (default 30)")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds before each level's window")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (ends a level early)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=DEFAULT_PROMPT_WORDS)
    parser.add_argument("--system-words", type=int, default=0, help="words of a system message all requests share")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="for servers that reject the field: tokens are then counted as they come",
    )
    parser.add_argument("--extra-body", type=json.loads, default={}, help="JSON object merged into every request")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--seed", type=int, default=0, help="another seed, other prompts (e.g. to rerun on one server)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = Workload(
        url=args.url.rstrip("/"),
        model=args.model,
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        system_words=args.system_words,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=args.extra_body,
        seed=args.seed,
    )
    # A request count alone runs each level to its end; otherwise the window is a duration (either may cut it).
    duration = args.duration if args.duration is not None else math.inf if args.requests else 30.0
    results = []
    for concurrency in args.concurrency:
        result = asyncio.run(run_level(workload, concurrency, duration, warmup=args.warmup, max_requests=args.requests))
        results.append(result)
        print(format_level(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
