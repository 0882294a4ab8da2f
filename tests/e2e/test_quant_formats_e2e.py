"""Every quantized weight format through both dialects, on real weights: a written Q8_0 and Q4_K_M file
(tests/gguf_writer.py) and GPTQ, AWQ and compressed-tensors checkpoints packed from the default model's weights
(tests/prequantized_writer.py), in one models folder behind one server that keeps one model loaded at a time. Each
answers a greedy chat in the OpenAI and the Ollama dialect, and says what it runs: /api/ps and /api/show name its
quantization, and its worker's log line does too.

The files and folders are written once into the cache's `quality` folder (as bench/quality.py and bench/step.py
write them), and the worker keeps each GGUF file's converted copy: later runs only load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server
from tests.gguf_writer import write_file_type
from tests.prequantized_writer import SYNTHETIC, write_default_model
from worker.catalog import DEFAULT_CHAT, wheel_file

pytestmark = pytest.mark.e2e

SMALL_KV = "--worker-arg=--kv-cache-bytes=134217728"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 16
# Served name: what /api/ps and /api/show say as `quantization_level`, and the worker's log line in parentheses.
FORMATS = {
    "SmolLM2-135M-Instruct:q8_0": ("Q8_0", "gguf"),
    "SmolLM2-135M-Instruct:q4_k_m": ("Q4_K_M", "gguf"),
    "SmolLM2-135M-Instruct-GPTQ": ("GPTQ-INT4", "gptq"),
    "SmolLM2-135M-Instruct-AWQ": ("AWQ-INT4", "awq"),
    "SmolLM2-135M-Instruct-compressed-tensors": ("COMPRESSED-TENSORS-INT4", "compressed-tensors"),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Links to the written files and folders (the worker's converted copies are keyed by the real path)."""
    cache = Path(os.environ.get("TANDEM_CACHE_DIR") or Path.home() / ".cache" / "tandem")
    shipped = wheel_file(DEFAULT_CHAT, ".gguf")
    assert shipped is not None
    written = [write_file_type(shipped, cache / "quality", file_type) for file_type in ("Q8_0", "Q4_K_M")]
    written += write_default_model(cache / "quality", list(SYNTHETIC), cache)
    folder = tmp_path_factory.mktemp("quant-models")
    for path in written:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def quant_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("quant"),
        "--models-dir",
        str(models_dir),
        "--no-hf-cache",
        "--no-embedding-model",
        "--max-loaded-models",
        "1",
        SMALL_KV,
    )
    yield server
    assert server.stop() == 0, server.log()


def test_every_format_is_listed_with_its_quantization(quant_server: Server) -> None:
    tags = httpx.get(f"{quant_server.base_url}/api/tags").json()["models"]
    levels = {m["name"].removesuffix(":latest"): m["details"]["quantization_level"] for m in tags}
    assert levels == {"SmolLM2-135M-Instruct": "Q4_1"} | {name: level for name, (level, _) in FORMATS.items()}


@pytest.mark.parametrize("model", list(FORMATS))
def test_each_format_answers_both_dialects_and_says_what_it_runs(quant_server: Server, model: str) -> None:
    url = quant_server.base_url
    level, source = FORMATS[model]
    openai = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": MAX_TOKENS},
        timeout=300,  # the first request for a model loads it
    )
    assert openai.status_code == 200, openai.text
    body = openai.json()
    answer, usage = body["choices"][0]["message"]["content"], body["usage"]
    # Words, not noise. Not always right, nor always about France: these are re-quantized weights of a 135M model,
    # whose first greedy token here is a near-tie ("The" or "L'", within one bf16 step of the logits), so rounding
    # decides it. The written Q4_K_M file has answered "L'Étoile (The City of Love) is the capital of France", the
    # Q8_0 file "L'Étoile, la Marseillaise, la femme," on one build and "The capital of France is Paris." on another.
    # A broken kernel gives fragments, digits and symbols, or one token repeated.
    assert body["model"] == model and ("Paris" in answer or "France" in answer or is_words(answer)), body
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS and usage["prompt_tokens"] > 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    ollama = httpx.post(
        f"{url}/api/chat", json={"model": model, "messages": QUESTION, "stream": False, "options": options}, timeout=300
    )
    assert ollama.status_code == 200, ollama.text
    reply = ollama.json()
    assert reply["model"] == model and reply["done"] is True
    assert reply["message"]["content"] == answer  # greedy, the same prompt: the same tokens in either dialect
    assert reply["eval_count"] == usage["completion_tokens"]
    assert reply["prompt_eval_count"] == usage["prompt_tokens"]

    [running] = loaded(quant_server)  # --max-loaded-models 1: this one, and only it
    assert running["name"] == ollama_name(model) and running["details"]["quantization_level"] == level
    shown = httpx.post(f"{url}/api/show", json={"model": model}).json()  # the loaded worker's own card
    assert (shown["details"]["quantization_level"], shown["details"]["format"]) == (level, source)
    log = quant_server.log_path.read_text(errors="replace")
    assert re.search(rf"loaded \S+ \({re.escape(source)}, torch\.\w+, {re.escape(level)}\)", log), log[-3000:]


def is_words(text: str) -> bool:
    """At least three distinct words of two letters or more, and letters most of what is not space."""
    words = re.findall(r"[^\W\d_]{2,}", text)
    letters = sum(ch.isalpha() for ch in text)
    return len(set(words)) >= 3 and letters >= 0.6 * len("".join(text.split()))


def loaded(server: Server) -> list[dict[str, Any]]:
    return list(httpx.get(f"{server.base_url}/api/ps").json()["models"])


def ollama_name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"
