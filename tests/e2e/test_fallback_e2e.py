"""A model folder of an architecture the native runner does not compute serves through the fallback runners: the real
launcher, worker and gateway, a tiny random-weight model saved with the SmolLM2 tokenizer, answering over HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Server, start_server
from tests.unit.tiny_model import fallback_loaded, smollm2_tokenizer

pytestmark = pytest.mark.e2e

# The architecture, and what the worker's log says about the path it takes.
PATHS = {
    "gemma3_text": "fallback path: transformers' own forward pass, all sequences of a step in one batch",
    "opt": "fallback path, serial: transformers' own forward pass, one sequence at a time, prefix caching off",
}


@pytest.fixture(scope="module", params=list(PATHS))
def fallback_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Server]]:
    model_type = request.param
    folder = tmp_path_factory.mktemp("models") / f"tiny-{model_type}"
    loaded = fallback_loaded(smollm2_tokenizer(), model_type)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    server = start_server(tmp_path_factory.mktemp(model_type), "--model", str(folder))
    yield model_type, server
    assert server.stop() == 0, server.log()


def test_a_fallback_model_answers_both_dialects(fallback_server: tuple[str, Server]) -> None:
    model_type, server = fallback_server
    replies = [
        httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": f"tiny-{model_type}",
                "messages": [{"role": "user", "content": f"Hello number {i}"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=60,
        )
        for i in range(2)
    ]
    for reply in replies:
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
    ollama = httpx.post(  # the Ollama chat route, on the same model and path
        f"{server.base_url}/api/chat",
        json={
            "model": f"tiny-{model_type}",
            "messages": [{"role": "user", "content": "Hello"}],
            "stream": False,
            "options": {"temperature": 0, "num_predict": 4},
        },
        timeout=60,
    )
    assert ollama.status_code == 200, ollama.text
    body = ollama.json()
    assert body["message"]["role"] == "assistant" and isinstance(body["message"]["content"], str)
    assert body["done"] is True and body["done_reason"] in ("stop", "length")
    assert 1 <= body["eval_count"] <= 4 and (body["eval_count"] == 4 or body["done_reason"] == "stop")
    log = server.log_path.read_text(errors="replace")
    assert PATHS[model_type] in log, log[-3000:]
    models = httpx.get(f"{server.base_url}/api/tags", timeout=10).json()["models"]
    assert models[0]["details"]["family"] == model_type
