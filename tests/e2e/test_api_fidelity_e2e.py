"""API fidelity on real models through the official clients: structured outputs, tool calls, thinking, n, logprobs,
legacy completions and the Ollama model endpoints.

Thinking and tools need a chat template that has them, so a second server serves the default model's own weights
behind a Qwen3-style template (conftest.py builds it, nothing downloaded). A 135M model will not decide to call a
tool or to think on its own, so the tests make the real path deterministic instead of faking it: the template opens the
<think> block as Qwen3-Thinking's does, and OpenAI's tool_choice forces the call through the grammar, after which the
worker's own parser reads it back. Ollama has no tool_choice: its tool-call rendering is covered in the unit tests.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
NO_THINKING: Any = {"chat_template_kwargs": {"enable_thinking": False}}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "country", "is_capital"],
    "additionalProperties": False,
}
DESCRIBE_PARIS = [{"role": "user", "content": "Describe Paris as JSON with the keys city, country and is_capital."}]


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ollama_client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.base_url)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def thinking_client(thinking_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thinking_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def thinking_model(thinking_client: openai.OpenAI) -> str:
    return thinking_client.models.list().data[0].id


# -- structured outputs -------------------------------------------------------------------------


def test_json_object_answer_is_a_json_object(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model, messages=DESCRIBE_PARIS, temperature=0, max_tokens=60, response_format={"type": "json_object"}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_json_schema_answer_validates(client: openai.OpenAI, model: str) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
    }
    completion = client.chat.completions.create(
        model=model, messages=DESCRIBE_PARIS, temperature=0, max_tokens=60, response_format=response_format
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), CITY_SCHEMA)
    streamed = client.chat.completions.create(
        model=model,
        messages=DESCRIBE_PARIS,
        temperature=0.8,
        seed=3,
        max_tokens=60,
        response_format=response_format,
        stream=True,
    )
    jsonschema.validate(
        json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), CITY_SCHEMA
    )


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.parse(
        model=model, messages=DESCRIBE_PARIS, temperature=0, max_tokens=60, response_format=City
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.city


def test_unsupported_schema_is_a_400(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert "unsupported JSON schema" in caught.value.message and "Lookbehind" in caught.value.message


def test_ollama_format_json_and_schema(ollama_client: ollama.Client, model: str) -> None:
    options = {"temperature": 0, "num_predict": 60}
    chat = ollama_client.chat(model=model, messages=DESCRIBE_PARIS, format="json", options=options)
    assert isinstance(json.loads(chat.message.content or ""), dict)
    generated = ollama_client.generate(
        model=model, prompt=DESCRIBE_PARIS[0]["content"], format=CITY_SCHEMA, options=options
    )
    jsonschema.validate(json.loads(generated.response), CITY_SCHEMA)
    streamed = ollama_client.chat(
        model=model, messages=DESCRIBE_PARIS, format=CITY_SCHEMA, options=options, stream=True
    )
    jsonschema.validate(json.loads("".join(part.message.content or "" for part in streamed)), CITY_SCHEMA)


# -- n, logprobs, legacy completions, model endpoints -------------------------------------------


def test_n_choices_with_logprobs(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, seed=11, temperature=1.0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.usage is not None
    tokens = 0
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in choice.logprobs.content)
        tokens += len(choice.logprobs.content)
    assert tokens == completion.usage.completion_tokens  # one entry per output token, no end token


def test_legacy_completions(client: openai.OpenAI, model: str) -> None:
    prompt = "The capital of France is"
    completion = client.completions.create(
        model=model, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    )
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert choice.logprobs is not None and choice.logprobs.tokens and len(choice.logprobs.tokens) == 5
    assert choice.logprobs.text_offset is not None and choice.logprobs.text_offset[0] == len(prompt)
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, stream=True)
    assert prompt + "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_ollama_generate_show_and_ps(ollama_client: ollama.Client, model: str) -> None:
    greedy = {"temperature": 0}  # Ollama samples at 0.8 by default: the model might end after any token
    generated = ollama_client.generate(
        model=model, prompt="What is the capital of France?", options={**greedy, "num_predict": 8}
    )
    assert generated.done and generated.response and generated.eval_count
    raw = ollama_client.generate(
        model=model, prompt="The capital of France is", raw=True, options={**greedy, "num_predict": 4}
    )
    assert raw.done and raw.eval_count == 4
    shown = ollama_client.show(model)
    assert shown.capabilities == ["completion"]  # the default template renders neither tools nor thinking
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] > 0 and shown.template
    running = ollama_client.ps()  # as Ollama names them; on a CPU nothing is in VRAM
    assert [m.model for m in running.models] == [f"{model}:latest"] and running.models[0].size


def test_tools_for_a_template_without_them_are_ignored_with_a_warning(server: Server, model: str) -> None:
    """Chat UIs (Open WebUI) send their tools with every chat; a model whose template cannot render them answers
    without them, in both dialects, and says so in a header."""
    options = {"temperature": 0, "num_predict": 8}
    plain = ollama.Client(host=server.base_url).chat(model=model, messages=WEATHER_QUESTION, options=options)
    body = {"model": model, "messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "stream": False, "options": options}
    with_tools = httpx.post(f"{server.base_url}/api/chat", json=body, timeout=60)
    assert with_tools.status_code == 200 and "tools ignored" in with_tools.headers["warning"]
    assert with_tools.json()["message"]["content"] == plain.message.content  # the same answer: tools never shown
    openai_body = {"model": model, "messages": WEATHER_QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 8}
    answered = httpx.post(f"{server.base_url}/v1/chat/completions", json=openai_body, timeout=60)
    assert answered.status_code == 200 and "tools ignored" in answered.headers["warning"]


def test_model_endpoint_and_request_id(server: Server, model: str) -> None:
    retrieved = httpx.get(f"{server.base_url}/v1/models/{model}", timeout=10)
    assert retrieved.json() == {**retrieved.json(), "id": model, "object": "model", "owned_by": "tandem"}
    assert isinstance(retrieved.json()["created"], int)
    body = {"model": model, "messages": QUESTION, "max_tokens": 2}
    answered = httpx.post(
        f"{server.base_url}/v1/chat/completions", json=body, headers={"x-request-id": "fidelity-1"}, timeout=60
    )
    assert answered.status_code == 200 and answered.headers["x-request-id"] == "fidelity-1"


# -- thinking and tools, on the Qwen3-style template ---------------------------------------------


def test_capabilities_tell_the_truth(thinking_server: Server, thinking_model: str) -> None:
    shown = ollama.Client(host=thinking_server.base_url).show(thinking_model)
    assert shown.capabilities == ["completion", "tools", "thinking"]


def test_openai_thinking_goes_to_reasoning_content(thinking_client: openai.OpenAI, thinking_model: str) -> None:
    completion = thinking_client.chat.completions.create(
        model=thinking_model, messages=QUESTION, temperature=0, max_tokens=16
    )
    message: Any = completion.choices[0].message
    assert message.reasoning_content and message.reasoning == message.reasoning_content  # --reasoning-field
    assert "<think>" not in (message.content or "") and "think>" not in message.reasoning_content
    chunks = list(
        thinking_client.chat.completions.create(
            model=thinking_model, messages=QUESTION, temperature=0, max_tokens=16, stream=True
        )
    )
    deltas: list[Any] = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == (message.content or "")


def test_openai_enable_thinking_false(thinking_client: openai.OpenAI, thinking_model: str) -> None:
    completion = thinking_client.chat.completions.create(
        model=thinking_model, messages=QUESTION, temperature=0, max_tokens=16, extra_body=NO_THINKING
    )
    message: Any = completion.choices[0].message
    assert message.content and getattr(message, "reasoning_content", None) is None


def test_ollama_thinking_and_think_false(thinking_server: Server, thinking_model: str) -> None:
    client = ollama.Client(host=thinking_server.base_url)
    options = {"temperature": 0, "num_predict": 16}
    thought = client.chat(model=thinking_model, messages=QUESTION, think=True, options=options)
    assert thought.message.thinking and "<think>" not in (thought.message.content or "")
    plain = client.chat(model=thinking_model, messages=QUESTION, think=False, options=options)
    assert plain.message.content and plain.message.thinking is None
    generated = client.generate(model=thinking_model, prompt=QUESTION[0]["content"], think=True, options=options)
    assert generated.thinking == thought.message.thinking


def test_forced_tool_call_whole_and_streamed(thinking_client: openai.OpenAI, thinking_model: str) -> None:
    tools: Any = [WEATHER_TOOL]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    completion = thinking_client.chat.completions.create(
        model=thinking_model,
        messages=WEATHER_QUESTION,
        temperature=0,
        max_tokens=40,
        tools=tools,
        tool_choice=named,
        extra_body=NO_THINKING,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call: Any = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])  # type: ignore[index]

    chunks = list(
        thinking_client.chat.completions.create(
            model=thinking_model,
            messages=WEATHER_QUESTION,
            temperature=0,
            max_tokens=40,
            tools=tools,
            tool_choice="required",
            stream=True,
            extra_body=NO_THINKING,
        )
    )
    fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    assert fragments[0].id and fragments[0].type == "function" and fragments[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert {f.index for f in fragments} == {0}
    arguments = "".join((f.function and f.function.arguments) or "" for f in fragments)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_results_in_history(thinking_server: Server, thinking_client: openai.OpenAI, thinking_model: str) -> None:
    history: Any = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
    ]
    completion = thinking_client.chat.completions.create(
        model=thinking_model,
        messages=history,
        tools=[WEATHER_TOOL],
        max_tokens=8,
        temperature=0,
        extra_body=NO_THINKING,  # type: ignore[list-item]
    )
    assert completion.choices[0].message.content and completion.choices[0].finish_reason in ("stop", "length")
    ollama_history: Any = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
    ]
    answer = ollama.Client(host=thinking_server.base_url).chat(
        model=thinking_model,
        messages=ollama_history,
        tools=[WEATHER_TOOL],
        think=False,
        options={"temperature": 0, "num_predict": 8},
    )
    assert answer.done and answer.message.content
