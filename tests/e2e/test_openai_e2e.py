"""The OpenAI dialect, driven by the official `openai` client and raw httpx streams, on the real model."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_list_names_the_default_model(client: openai.OpenAI, model: str) -> None:
    assert model == "SmolLM2-135M-Instruct"
    assert client.models.retrieve(model).id == model


def test_chat_completion_answers_coherently(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 10
    assert 0 < completion.usage.completion_tokens <= 40
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_streamed_chat_equals_the_folded_answer(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=30)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stream_without_include_usage_has_no_usage_chunk(server: Server, model: str) -> None:
    body = {"model": model, "messages": QUESTION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(chunk["choices"] for chunk in chunks)
    assert all(line.startswith("data: ") for line in lines)


def test_max_tokens_ends_with_length(client: openai.OpenAI, model: str) -> None:
    long_question = [{"role": "user", "content": "Write a long story about a dragon."}]
    completion = client.chat.completions.create(model=model, messages=long_question, max_tokens=7, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    completion = client.chat.completions.create(
        model=model, messages=long_question, max_completion_tokens=5, temperature=0
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_stop_string_never_leaks(client: openai.OpenAI, model: str) -> None:
    free = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40)
    text = free.choices[0].message.content or ""
    assert "Paris" in text
    stopped = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=40, stop="Par")
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index("Par")]
    streamed = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=40, stop=["aris", "zzz"], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index("aris")]


def test_temperature_zero_and_seed_reproduce(client: openai.OpenAI, model: str) -> None:
    story = [{"role": "user", "content": "Tell me a short story about a cat."}]

    def ask(**kwargs: object) -> str:
        completion = client.chat.completions.create(model=model, messages=story, max_tokens=24, **kwargs)  # type: ignore[call-overload]
        return completion.choices[0].message.content or ""

    assert ask(temperature=0) == ask(temperature=0)
    assert ask(temperature=1.0, seed=1234) == ask(temperature=1.0, seed=1234)
    seeded = {ask(temperature=1.0, seed=seed) for seed in range(4)}
    assert len(seeded) > 1  # different seeds really sample differently


def test_content_as_list_of_text_parts_equals_a_string(client: openai.OpenAI, model: str) -> None:
    def ask(content: object) -> str:
        completion = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": "You are a geography teacher."},
                {"role": "user", "content": content},
            ],  # type: ignore[list-item]
            temperature=0,
            max_tokens=20,
        )
        return completion.choices[0].message.content or ""

    as_string = ask("What is the capital of France?")
    assert as_string
    assert ask([{"type": "text", "text": "What is the capital of France?"}]) == as_string


def test_unknown_fields_are_ignored(server: Server, model: str) -> None:
    body = {"model": model, "messages": QUESTION, "max_tokens": 3, "some_future_field": {"x": 1}, "user": "u1"}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
