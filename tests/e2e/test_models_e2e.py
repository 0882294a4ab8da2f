"""Several models in one server, on real weights: two chat models (the default, and its weights behind a Qwen3-style
template, built here) and the embedding model all-MiniLM-L6-v2 are listed; each answers; the first request for one
loads it (eight at once load it once); keep_alive 0 unloads it (its process is gone); `--max-loaded-models 1`
evicts the idle one; embeddings through the official clients equal sentence-transformers' on the same text."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import openai
import pytest

from tests.e2e.conftest import MODEL_FILES, QWEN3_STYLE_TEMPLATE, Server, converted_default_model, start_server
from worker.catalog import DEFAULT_CHAT, DEFAULT_EMBEDDING, wheel_file

pytestmark = pytest.mark.e2e

CHAT = "SmolLM2-135M-Instruct"
THINKING = "SmolLM2-Qwen3-template"
EMBEDDING = "all-MiniLM-L6-v2"
SMALL_KV = "--worker-arg=--kv-cache-bytes=134217728"  # three workers at once on a shared 2-core machine
TEXTS = ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply on Monday."]
HI = [{"role": "user", "content": "Say hi."}]


def wait_until(predicate: Any, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def loaded(server: Server) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(f"{server.base_url}/api/ps").json()["models"]}


def worker_pid(server: Server, model: str) -> int:
    [pid] = [w["pid"] for w in server.health().json()["workers"] if model in w["models"]]
    return int(pid)


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def chat(server: Server, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "messages": HI, "stream": False, "options": {"num_predict": 4, "temperature": 0}}
    return httpx.post(f"{server.base_url}/api/chat", json={**body, **fields}, timeout=300)


@pytest.fixture(scope="module")
def models_dir(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the second chat model: the default's converted weights behind a Qwen3-style
    template (the session's `server` made that copy)."""
    folder = tmp_path_factory.mktemp("models")
    model = folder / THINKING
    model.mkdir()
    for name in MODEL_FILES:
        (model / name).symlink_to(converted_default_model() / name)
    (model / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def multi(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    gguf = wheel_file(DEFAULT_CHAT, ".gguf")
    assert gguf is not None
    server = start_server(
        tmp_path_factory.mktemp("multi"),
        "--model",
        str(gguf),
        "--models-dir",
        str(models_dir),
        "--no-hf-cache",  # any causal LM in this machine's cache would be listed too
        SMALL_KV,
    )
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def reference() -> Any:
    from sentence_transformers import SentenceTransformer

    config = wheel_file(DEFAULT_EMBEDDING, "model/config.json")
    assert config is not None
    return SentenceTransformer(str(config.parent), device="cpu")


def test_every_model_is_listed_with_its_capabilities(multi: Server) -> None:
    tags = [m["name"] for m in httpx.get(f"{multi.base_url}/api/tags").json()["models"]]
    assert tags == [f"{CHAT}:latest", f"{THINKING}:latest", f"{EMBEDDING}:latest"]
    ids = [m["id"] for m in httpx.get(f"{multi.base_url}/v1/models").json()["data"]]
    assert ids == [CHAT, THINKING, EMBEDDING]
    shown = {name: ollama.Client(host=multi.base_url).show(name) for name in ids}
    assert shown[CHAT].capabilities == ["completion"]
    assert shown[THINKING].capabilities == ["completion", "tools", "thinking"]
    assert shown[EMBEDDING].capabilities == ["embedding"]
    assert shown[EMBEDDING].modelinfo is not None and shown[EMBEDDING].modelinfo["bert.embedding_length"] == 384
    assert list(loaded(multi)) == [f"{CHAT}:latest"]  # the first model is loaded at start; the others on demand


def test_eight_concurrent_first_requests_load_a_model_once(multi: Server) -> None:
    client = openai.OpenAI(base_url=f"{multi.base_url}/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda text: client.embeddings.create(model=EMBEDDING, input=text), (TEXTS * 3)[:8]))
    assert len(answers) == 8 and all(len(a.data[0].embedding) == 384 for a in answers)
    assert multi.log().count(f"loading {EMBEDDING} from") == 1
    assert f"{EMBEDDING}:latest" in loaded(multi)


def test_each_chat_model_answers_and_the_second_loads_on_demand(multi: Server) -> None:
    first = chat(multi, CHAT)
    second = chat(multi, THINKING + ":latest", think=True)
    assert first.status_code == 200 and first.json()["message"]["content"]
    assert second.status_code == 200 and second.json()["done"] is True
    assert second.json()["load_duration"] > 0  # it waited for the load
    ps = loaded(multi)
    assert set(ps) == {f"{CHAT}:latest", f"{THINKING}:latest", f"{EMBEDDING}:latest"}
    for model in ps.values():
        assert model["size"] > 0 and model["context_length"] > 0 and model["expires_at"] > "2026"


def test_keep_alive_zero_unloads_and_the_process_is_gone(multi: Server) -> None:
    chat(multi, THINKING)
    pid = worker_pid(multi, THINKING)
    unload = httpx.post(f"{multi.base_url}/api/generate", json={"model": THINKING, "keep_alive": 0}, timeout=60)
    assert unload.json()["done_reason"] == "unload"
    assert f"{THINKING}:latest" not in loaded(multi) and is_gone(pid)
    load = httpx.post(f"{multi.base_url}/api/generate", json={"model": THINKING}, timeout=300).json()
    assert load["done_reason"] == "load" and f"{THINKING}:latest" in loaded(multi)
    # keep_alive on a real request (an OpenAI route, as an extension field): unloaded right after it
    client = openai.OpenAI(base_url=f"{multi.base_url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=THINKING, messages=HI, max_tokens=2, extra_body={"keep_alive": 0})
    wait_until(lambda: f"{THINKING}:latest" not in loaded(multi))


def test_embeddings_equal_the_reference_through_both_clients(multi: Server, reference: Any) -> None:
    expected = reference.encode(TEXTS)
    client = openai.OpenAI(base_url=f"{multi.base_url}/v1", api_key="unused", max_retries=0)
    sdk = client.embeddings.create(model=EMBEDDING, input=TEXTS)  # numpy is installed: the SDK asks for base64
    as_floats = client.embeddings.create(model=EMBEDDING, input=TEXTS, encoding_format="float")
    by_ollama = ollama.Client(host=multi.base_url).embed(model=EMBEDDING, input=TEXTS)
    raw = httpx.post(
        f"{multi.base_url}/v1/embeddings", json={"model": EMBEDDING, "input": TEXTS, "encoding_format": "base64"}
    ).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    assert [d.embedding for d in sdk.data] == [d.embedding for d in as_floats.data] == [v.tolist() for v in decoded]
    for vectors in ([d.embedding for d in sdk.data], by_ollama.embeddings):
        got = np.array(vectors)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        cosines = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
        assert cosines.min() >= 0.9999, cosines
        assert got[0] @ got[1] > got[0] @ got[2]  # a paraphrase scores above an unrelated sentence
    assert sdk.usage.prompt_tokens == by_ollama.prompt_eval_count > 0


def test_embedding_options_and_errors(multi: Server, reference: Any) -> None:
    url = multi.base_url
    tokens = reference.tokenizer(TEXTS[0])["input_ids"]
    by_tokens = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDING, "input": [tokens]}).json()
    by_text = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDING, "input": TEXTS[0]}).json()
    assert np.allclose(by_tokens["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    short = httpx.post(f"{url}/api/embed", json={"model": EMBEDDING, "input": TEXTS[0], "dimensions": 64}).json()
    [vector] = short["embeddings"]
    head = np.array(by_text["data"][0]["embedding"][:64])
    assert len(vector) == 64 and np.allclose(vector, head / np.linalg.norm(head), atol=1e-5)
    legacy = httpx.post(f"{url}/api/embeddings", json={"model": EMBEDDING, "prompt": TEXTS[0]}).json()
    assert np.allclose(legacy["embedding"], by_text["data"][0]["embedding"], atol=1e-6)
    long = " ".join(["word"] * 400)
    assert httpx.post(f"{url}/api/embed", json={"model": EMBEDDING, "input": long}).status_code == 200
    refused = httpx.post(f"{url}/api/embed", json={"model": EMBEDDING, "input": long, "truncate": False})
    assert refused.status_code == 400 and "longer than the context" in refused.json()["error"]
    not_chat = httpx.post(f"{url}/api/chat", json={"model": EMBEDDING, "messages": HI})
    assert (not_chat.status_code, not_chat.json()) == (400, {"error": f'"{EMBEDDING}" does not support chat'})
    not_embedding = httpx.post(f"{url}/v1/embeddings", json={"model": CHAT, "input": "x"})
    assert not_embedding.status_code == 400 and not_embedding.json()["error"]["param"] == "model"


def test_pull_answers_like_ollama_and_the_rest_is_refused(multi: Server) -> None:
    client = ollama.Client(host=multi.base_url)
    assert [p.status for p in client.pull(CHAT, stream=True)][-1] == "success"
    assert client.pull(EMBEDDING).status == "success"
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        client.pull("no-such-model")
    for call in (lambda: client.delete(CHAT), lambda: client.copy(CHAT, "other")):
        with pytest.raises(ollama.ResponseError, match="does not") as refused:
            call()
        assert refused.value.status_code == 501


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("one"), "--max-loaded-models", "1", SMALL_KV)
    yield server
    assert server.stop() == 0, server.log()


def test_max_loaded_models_one_evicts_the_idle_model(one_at_a_time: Server) -> None:
    server = one_at_a_time
    pid = worker_pid(server, CHAT)
    vectors = ollama.Client(host=server.base_url).embed(model=EMBEDDING, input="hello").embeddings
    assert len(vectors[0]) == 384
    assert list(loaded(server)) == [f"{EMBEDDING}:latest"] and is_gone(pid)
    assert chat(server, CHAT).status_code == 200  # and back: the embedding model makes room in turn
    assert list(loaded(server)) == [f"{CHAT}:latest"]
    log = server.log()
    assert re.search(rf"unloading {re.escape(CHAT)} \(to make room for {re.escape(EMBEDDING)}\)", log)


def test_an_idle_model_unloads_when_its_keep_alive_runs_out(one_at_a_time: Server) -> None:
    server = one_at_a_time
    assert chat(server, CHAT, keep_alive="1s").status_code == 200
    wait_until(lambda: loaded(server) == {})
