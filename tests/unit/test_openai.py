"""The OpenAI dialect without a model: golden translations and shapes, then the endpoints on a scripted pool.

Shapes follow the OpenAI API reference (chat object, chat chunk object, legacy completions, models, errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import httpx2
import msgspec
import openai
import pytest
from fake_pool import ScriptedPool, Step
from starlette.applications import Starlette

from common.protocol import (
    ChatMessage,
    Delta,
    Done,
    ForcedToolCall,
    Generate,
    Logprob,
    ModelCard,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from gateway import openai as dialect
from gateway import openai_requests as requests
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    ContextLengthExceeded,
    GatewayError,
    InternalError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    Unauthorized,
    Unavailable,
)
from gateway.streaming import Folded

pytestmark = pytest.mark.anyio

CARD = ModelCard(name="SmolLM2-135M-Instruct", context_length=8192, architecture="llama")
HI = [{"role": "user", "content": "hi"}]
SERVER_CAP = GatewayConfig.default_max_tokens  # the output limit of a request that sets none, its model neither


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the gateway is asyncio code


# -- a scripted stand-in for WorkerPool ---------------------------------------------------------


def done(prompt: int = 5, completion: int = 2, reason: str = "stop", cached: int = 0) -> Done:
    return Done(id=0, finish_reason=reason, usage=Usage(prompt, completion, cached))  # type: ignore[arg-type]


HELLO: list[Step] = [Delta(id=0, text="Hel"), Delta(id=0, text="lo"), done()]


class FakePool(ScriptedPool):
    """The scripted pool serving this module's CARD, by default answering "Hello"."""

    def __init__(self, script: Callable[[Generate], list[Step]] | list[Step] = HELLO) -> None:
        super().__init__(CARD, script)


@contextlib.asynccontextmanager
async def running(pool: FakePool, **config: Any) -> AsyncIterator[Starlette]:
    app = create_app(GatewayConfig(workers=(), **config), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        yield app


@contextlib.asynccontextmanager
async def client_for(pool: FakePool, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running(pool, **config) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


@contextlib.asynccontextmanager
async def sdk_for(pool: FakePool) -> AsyncIterator[openai.AsyncOpenAI]:
    async with running(pool) as app:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
        async with openai.AsyncOpenAI(base_url="http://tandem/v1", api_key="x", max_retries=0, http_client=http) as sdk:
            yield sdk


def sse_payloads(response: httpx.Response) -> list[Any]:
    """Every `data:` payload, JSON-decoded except [DONE]; asserts the framing on the way."""
    assert response.text.endswith("\n\n")
    payloads = []
    for event in response.text.removesuffix("\n\n").split("\n\n"):
        assert event.startswith("data: "), event
        data = event.removeprefix("data: ")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def chat_request(**fields: Any) -> requests.ChatCompletionRequest:
    return msgspec.json.decode(
        json.dumps({"model": CARD.name, "messages": HI, **fields}), type=requests.ChatCompletionRequest
    )


def completion_request(**fields: Any) -> requests.CompletionRequest:
    return msgspec.json.decode(
        json.dumps({"model": CARD.name, "prompt": "Once", **fields}), type=requests.CompletionRequest
    )


# -- translation --------------------------------------------------------------------------------


def test_minimal_chat_request_uses_openai_defaults() -> None:
    assert requests.to_generate(chat_request(), CARD) == Generate(
        id=0,
        model=CARD.name,
        params=SamplingParams(max_tokens=SERVER_CAP),
        messages=[ChatMessage(role="user", content="hi")],
    )


def test_every_chat_field_maps_onto_generate() -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    body = chat_request(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "thought",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        ],
        max_tokens=99,
        max_completion_tokens=50,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100, "7": 5.5},
        user="someone",
        logprobs=True,
        top_logprobs=3,
        response_format={"type": "text"},
        tools=tools,
        tool_choice="auto",
        reasoning_effort="low",
        chat_template_kwargs={"enable_thinking": True, "custom": 1},
        top_k=-1,
        min_p=0.05,
        repetition_penalty=1.2,
        ignore_eos=True,
        stop_token_ids=[2],
        parallel_tool_calls=True,
        metadata={"x": "y"},
    )
    assert requests.to_generate(body, CARD) == Generate(
        id=0,
        model=CARD.name,
        params=SamplingParams(
            temperature=0.5,
            top_p=0.9,
            top_k=0,
            min_p=0.05,
            seed=7,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={42: -100.0, 7: 5.5},
            max_tokens=50,  # max_completion_tokens wins over the deprecated max_tokens
            stop=["END"],
            stop_token_ids=[2],
            ignore_eos=True,
            logprobs=3,
        ),
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="a\nb", name="ann"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=[ToolCall(function=ToolCallFunction(name="weather", arguments="{}"), id="c1")],
                reasoning="thought",
            ),
            ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
        ],
        tools=tools,
        think=True,
        template_kwargs={"custom": 1, "reasoning_effort": "low"},
    )


def test_nulls_mean_defaults_as_in_openai() -> None:
    body = chat_request(temperature=None, top_p=None, stop=None, n=None, logprobs=None, stream=None, max_tokens=None)
    assert requests.to_generate(body, CARD).params == SamplingParams(max_tokens=SERVER_CAP)


def test_stop_string_or_list_and_logprobs_without_top() -> None:
    assert requests.to_generate(chat_request(stop="x"), CARD).params.stop == ["x"]
    assert requests.to_generate(chat_request(stop=["a", "b"]), CARD).params.stop == ["a", "b"]
    assert requests.to_generate(chat_request(logprobs=True), CARD).params.logprobs == 0
    assert requests.to_generate(chat_request(logprobs=False), CARD).params.logprobs is None


TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "g"}},
]


@pytest.mark.parametrize(
    ("choice", "tools", "forced"),
    [
        (None, TOOLS, None),
        ("auto", TOOLS, None),
        ("none", None, None),  # the template never sees the tools
        ("required", TOOLS, ForcedToolCall()),
        ({"type": "function", "function": {"name": "g"}}, TOOLS, ForcedToolCall(name="g")),
    ],
)
def test_tool_choice(choice: Any, tools: Any, forced: ForcedToolCall | None) -> None:
    generate = requests.to_generate(chat_request(tools=TOOLS, tool_choice=choice), CARD)
    assert (generate.tools, generate.force_tool_call) == (tools, forced)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"tool_choice": "required"},
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "h"}}},
            "Invalid value for 'tool_choice': no function named 'h' was specified in the 'tools' parameter.",
        ),
        (
            {"tools": TOOLS, "tool_choice": "always"},
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": …}}.',
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}},
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": …}}.',
        ),
    ],
)
def test_bad_tool_choice_is_a_400(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        requests.to_generate(chat_request(**fields), CARD)
    assert (caught.value.message, caught.value.param) == (message, "tool_choice")


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    ("response_format", "json_schema"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, '{"type":"object"}'),
        (
            {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}},
            json.dumps(SCHEMA),
        ),
        ({"type": "json_schema", "json_schema": {"name": "anything"}}, "{}"),
    ],
)
def test_response_format_becomes_a_json_schema(response_format: Any, json_schema: str | None) -> None:
    params = requests.to_generate(chat_request(response_format=response_format), CARD).params
    assert params.json_schema == (json_schema and json.dumps(json.loads(json_schema), separators=(",", ":")))


def test_enable_thinking_false_and_user_reasoning_effort_wins() -> None:
    body = chat_request(
        chat_template_kwargs={"enable_thinking": False, "reasoning_effort": "high"}, reasoning_effort="low"
    )
    generate = requests.to_generate(body, CARD)
    assert generate.think is False and generate.template_kwargs == {"reasoning_effort": "high"}


@pytest.mark.parametrize(
    ("fields", "message", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "Image inputs are not supported: the served models read text only",
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "Content parts of type 'input_audio' are not supported",
            "messages[0].content",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format",
        ),
        ({"top_logprobs": 2}, "top_logprobs requires logprobs to be true", "top_logprobs"),
        ({"logit_bias": {"hello": 1}}, 'logit_bias keys must be token ids, e.g. {"50256": -100}', "logit_bias"),
        (
            {"chat_template_kwargs": {"enable_thinking": "yes"}},
            "chat_template_kwargs.enable_thinking must be a boolean",
            "chat_template_kwargs",
        ),
    ],
)
def test_unsupported_inputs_are_clear_400s(fields: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        requests.to_generate(chat_request(**fields), CARD)
    assert (caught.value.message, caught.value.param, caught.value.status) == (message, param, 400)


def test_choices_get_consecutive_seeds() -> None:
    generate = requests.to_generate(chat_request(seed=10), CARD)
    assert [g.params.seed for g in requests.for_choices(generate, 3)] == [10, 11, 12]
    unseeded = requests.to_generate(chat_request(), CARD)
    assert requests.for_choices(unseeded, 2) == [unseeded, unseeded]


def test_completion_request_is_a_raw_prompt_with_max_tokens_16() -> None:
    assert requests.text_to_generate(completion_request(), CARD, "Once") == Generate(
        id=0, model=CARD.name, params=SamplingParams(max_tokens=16), prompt="Once"
    )
    body = completion_request(max_tokens=None, logprobs=2, stop=["\n"], echo=True)
    assert requests.text_to_generate(body, CARD, "Once").params == SamplingParams(
        stop=["\n"], logprobs=2, max_tokens=SERVER_CAP
    )


@pytest.mark.parametrize(
    ("fields", "message", "param"),
    [
        ({"suffix": "end"}, "suffix is not supported", "suffix"),
        ({"best_of": 3}, "best_of is not supported; use n", "best_of"),
    ],
)
def test_completion_rejections(fields: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        requests.text_to_generate(completion_request(**fields), CARD, "Once")
    assert (caught.value.message, caught.value.param) == (message, param)


# -- renderers ----------------------------------------------------------------------------------

REPLY = dialect.Reply(id="chatcmpl-1", created=1700000000, model="smol", system_fingerprint="fp_1")
HEAD = {"id": "chatcmpl-1", "created": 1700000000, "model": "smol", "system_fingerprint": "fp_1"}
LOGPROB = Logprob(
    token="Hi", logprob=-0.5, bytes=[72, 105], top=[TokenLogprob("Hi", -0.5, [72, 105]), TokenLogprob("Yo", -1.5)]
)


def test_chat_chunk_shapes() -> None:
    assert dialect.chat_chunk(REPLY, 0, {"role": "assistant", "content": ""}) == {
        **HEAD,
        "object": "chat.completion.chunk",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ],
    }
    with_usage = dialect.Reply(**{**HEAD, "include_usage": True})
    assert dialect.chat_chunk(with_usage, 1, {}, finish_reason="length") == {
        **HEAD,
        "object": "chat.completion.chunk",
        "choices": [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        "usage": None,
    }


def test_chat_delta_carries_reasoning_content_and_optionally_reasoning() -> None:
    event = Delta(id=0, text="x", reasoning="why")
    assert dialect.chat_delta(event, reasoning_field=False) == {"reasoning_content": "why", "content": "x"}
    assert dialect.chat_delta(event, reasoning_field=True) == {
        "reasoning_content": "why",
        "reasoning": "why",
        "content": "x",
    }
    assert dialect.chat_delta(Delta(id=0), reasoning_field=True) == {}


def test_chat_logprobs_shape() -> None:
    assert dialect.chat_logprobs([LOGPROB]) == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.5,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                    {"token": "Yo", "logprob": -1.5, "bytes": None},
                ],
            }
        ],
        "refusal": None,
    }


def test_chat_completion_object() -> None:
    answer = Folded(
        parts=["Hel", "lo"], reasoning_parts=["hm"], logprobs=[LOGPROB], done=done(9, 2, "length", cached=4)
    )
    assert dialect.chat_completion(REPLY, [answer], reasoning_field=True, logprobs=True) == {
        **HEAD,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "reasoning_content": "hm", "reasoning": "hm"},
                "logprobs": dialect.chat_logprobs([LOGPROB]),
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "total_tokens": 11,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    plain = Folded(parts=["ok"], done=done())
    assert dialect.chat_completion(REPLY, [plain])["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "ok"},
        "logprobs": None,
        "finish_reason": "stop",
    }


CALL = ToolCall(id="call_1", function=ToolCallFunction(name="weather", arguments={"city": "Paris"}))


def test_tool_calls_in_the_chat_completion_object() -> None:
    answer = Folded(tool_calls=[CALL], done=done(reason="tool_calls"))
    assert dialect.chat_completion(REPLY, [answer])["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,  # only tool calls: null, as OpenAI sends it
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ]
    with_text = Folded(parts=["Let me look."], tool_calls=[CALL], done=done(reason="tool_calls"))
    assert dialect.chat_completion(REPLY, [with_text])["choices"][0]["message"]["content"] == "Let me look."


def test_tool_call_stream_fragments() -> None:
    second = ToolCall(id="call_2", function=ToolCallFunction(name="time", arguments={}))
    assert dialect.tool_call_deltas([CALL, second], first_index=3) == [
        {
            "tool_calls": [
                {"index": 3, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 3, "function": {"arguments": '{"city":"Paris"}'}}]},
        {
            "tool_calls": [
                {"index": 4, "id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 4, "function": {"arguments": "{}"}}]},
    ]


def test_usage_counts_each_prompt_once() -> None:
    dones = [done(10, 3), done(10, 4), done(20, 5), done(20, 6)]
    assert dialect.render_usage(dones, per_prompt=2) == {
        "prompt_tokens": 30,
        "completion_tokens": 18,
        "total_tokens": 48,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_text_completion_object_with_echo_and_logprobs() -> None:
    reply = dialect.Reply(id="cmpl-1", created=1700000000, model="smol", system_fingerprint="fp_1")
    answer = Folded(parts=["Hi"], logprobs=[LOGPROB], done=done())
    assert dialect.text_completion(reply, [answer], ["Say: "], logprobs=True) == {
        **HEAD,
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "Say: Hi",
                "logprobs": {
                    "tokens": ["Hi"],
                    "token_logprobs": [-0.5],
                    "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}],
                    "text_offset": [5],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


@pytest.mark.parametrize(
    ("error", "status", "type_", "code"),
    [
        (BadRequest("bad", param="temperature"), 400, "invalid_request_error", None),
        (ContextLengthExceeded("too long", param="messages"), 400, "invalid_request_error", "context_length_exceeded"),
        (Unauthorized("no key"), 401, "invalid_request_error", "invalid_api_key"),
        (NotFound("no route"), 404, "invalid_request_error", None),
        (PayloadTooLarge("big"), 413, "invalid_request_error", None),
        (ServerBusy("busy", headers={"Retry-After": "1"}), 429, "rate_limit_error", "server_busy"),
        (InternalError("oops"), 500, "server_error", None),
        (Unavailable("down"), 503, "server_error", "service_unavailable"),
        (RequestTimeout("slow"), 504, "server_error", "timeout"),
        (ClientDisconnected("gone"), 499, "invalid_request_error", "client_disconnected"),
    ],
)
def test_error_bodies(error: GatewayError, status: int, type_: str, code: str | None) -> None:
    response = dialect.render_error(error)
    assert response.status_code == status
    assert json.loads(response.body) == {
        "error": {"message": error.message, "type": type_, "param": error.param, "code": code}
    }
    assert response.headers.get("retry-after") == error.headers.get("Retry-After")


def test_model_not_found_body() -> None:
    response = dialect.render_error(ModelNotFound("nope"))
    assert response.status_code == 404
    assert json.loads(response.body) == {
        "error": {
            "message": "The model 'nope' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


# -- endpoints on a scripted pool ---------------------------------------------------------------


async def test_chat_completion_not_streamed() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post("/v1/chat/completions", json={"model": "smollm2-135m-instruct", "messages": HI})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["system_fingerprint"].startswith("fp_")
    assert {k: v for k, v in body.items() if k not in ("id", "created", "system_fingerprint")} == {
        "object": "chat.completion",
        "model": "smollm2-135m-instruct",  # the name the client used
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    assert len(response.headers["x-request-id"]) == 32


async def test_chat_stream_framing_without_usage() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": CARD.name, "messages": HI, "stream": True},
            headers={"x-request-id": "r-1"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"] == "r-1"
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]


async def test_chat_stream_with_include_usage() -> None:
    body = {"model": CARD.name, "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    async with client_for(FakePool()) as client:
        payloads = sse_payloads(await client.post("/v1/chat/completions", json=body))
    *chunks, usage, end = payloads
    assert end == "[DONE]"
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    assert usage["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_n_choices_stream_interleaved_with_their_index() -> None:
    def script(request: Generate) -> list[Step]:
        return [Delta(id=0, text=f"s{request.params.seed}"), done(completion=1)]

    body = {
        "model": CARD.name,
        "messages": HI,
        "n": 2,
        "seed": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client_for(FakePool(script)) as client:
        *chunks, usage, _ = sse_payloads(await client.post("/v1/chat/completions", json=body))
        whole = (await client.post("/v1/chat/completions", json={**body, "stream": False})).json()
    text = {0: "", 1: ""}
    for chunk in chunks:
        choice = chunk["choices"][0]
        text[choice["index"]] += choice["delta"].get("content", "")
    assert text == {0: "s5", 1: "s6"}
    assert usage["usage"]["prompt_tokens"] == 5 and usage["usage"]["completion_tokens"] == 2
    assert [c["message"]["content"] for c in whole["choices"]] == ["s5", "s6"]
    assert [c["index"] for c in whole["choices"]] == [0, 1]


async def test_logprobs_stream_in_openai_shape() -> None:
    pool = FakePool([Delta(id=0, text="Hi", logprobs=[LOGPROB]), done()])
    body = {"model": CARD.name, "messages": HI, "stream": True, "logprobs": True, "top_logprobs": 2}
    async with client_for(pool) as client:
        payloads = sse_payloads(await client.post("/v1/chat/completions", json=body))
    assert payloads[1]["choices"][0]["logprobs"] == dialect.chat_logprobs([LOGPROB])
    assert pool.requests[0].params.logprobs == 2


async def test_mid_stream_failure_is_one_error_event_and_no_done() -> None:
    pool = FakePool([Delta(id=0, text="Hel"), InternalError("The model worker crashed")])
    async with client_for(pool) as client:
        payloads = sse_payloads(
            await client.post("/v1/chat/completions", json={"model": CARD.name, "messages": HI, "stream": True})
        )
    assert payloads[-1] == {
        "error": {"message": "The model worker crashed", "type": "server_error", "param": None, "code": None}
    }
    assert "[DONE]" not in payloads


@pytest.mark.parametrize("stream", [False, True])
async def test_failures_before_the_first_event_get_their_status(stream: bool) -> None:
    body = {"model": CARD.name, "messages": HI, "stream": stream}
    async with client_for(FakePool([ServerBusy("Server is busy", headers={"Retry-After": "1"})])) as client:
        busy = await client.post("/v1/chat/completions", json=body)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert "x-request-id" in busy.headers
    async with client_for(
        FakePool([ContextLengthExceeded("Prompt exceeds the context length", param="messages")])
    ) as client:
        long = await client.post("/v1/chat/completions", json=body)
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"


async def test_unknown_model_malformed_json_and_field_errors() -> None:
    async with client_for(FakePool()) as client:
        unknown = await client.post("/v1/chat/completions", json={"model": "nope", "messages": HI})
        malformed = await client.post("/v1/chat/completions", content=b'{"model": ')
        hot = await client.post("/v1/chat/completions", json={"model": CARD.name, "messages": HI, "temperature": 3})
        role = await client.post("/v1/chat/completions", json={"model": CARD.name, "messages": [{"role": "robot"}]})
        missing = await client.post("/v1/chat/completions", json={"model": CARD.name})
        empty = await client.post("/v1/chat/completions", json={"model": CARD.name, "messages": []})
        no_route = await client.get("/v1/nothing")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert malformed.status_code == 400 and malformed.json()["error"]["message"].startswith(
        "Request body is not valid JSON"
    )
    assert hot.status_code == 400 and hot.json() == {
        "error": {
            "message": "Expected `float` <= 2.0 - at `$.temperature`",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    assert role.json()["error"]["message"] == "Invalid enum value 'robot' - at `$.messages[0].role`"
    assert role.json()["error"]["param"] == "messages[0].role"
    assert missing.json()["error"]["message"] == "Object missing required field `messages`"
    assert missing.json()["error"]["param"] == "messages"
    assert empty.json()["error"]["message"] == "Expected `array` of length >= 1 - at `$.messages`"
    assert no_route.status_code == 404 and set(no_route.json()["error"]) == {"message", "type", "param", "code"}


async def test_body_over_the_limit_is_413() -> None:
    async with client_for(FakePool(), max_body_bytes=100) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": CARD.name, "messages": [{"role": "user", "content": "x" * 200}]}
        )
    assert response.status_code == 413


async def test_models_list_and_retrieve() -> None:
    async with client_for(FakePool()) as client:
        listing = (await client.get("/v1/models")).json()
        one = await client.get(f"/v1/models/{CARD.name}")
        missing = await client.get("/v1/models/org/nope")
    created = listing["data"][0]["created"]
    assert listing == {
        "object": "list",
        "data": [
            {
                "id": CARD.name,
                "object": "model",
                "created": created,
                "owned_by": "tandem",
                "max_model_len": 8192,
                "capabilities": CARD.capabilities or ["completion"],
                "parent": None,
            }
        ],
    }
    assert one.json() == listing["data"][0]
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "The model 'org/nope' does not exist"


async def test_completions_not_streamed_and_streamed() -> None:
    pool = FakePool()
    body = {"model": CARD.name, "prompt": ["A", "B"], "echo": True, "stream_options": {"include_usage": True}}
    async with client_for(pool) as client:
        whole = (await client.post("/v1/completions", json=body)).json()
        payloads = sse_payloads(await client.post("/v1/completions", json={**body, "stream": True}))
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    assert whole["choices"] == [
        {"index": 0, "text": "AHello", "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "text": "BHello", "logprobs": None, "finish_reason": "stop"},
    ]
    assert whole["usage"]["prompt_tokens"] == 10 and whole["usage"]["completion_tokens"] == 4
    assert [r.prompt for r in pool.requests[:2]] == ["A", "B"] and pool.requests[0].params.max_tokens == 16
    *chunks, usage, end = payloads
    assert end == "[DONE]" and usage["choices"] == [] and usage["object"] == "text_completion"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == 0) == "AHello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completion_suffix_is_a_clean_400() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post("/v1/completions", json={"model": CARD.name, "prompt": "x", "suffix": "y"})
    assert response.status_code == 400 and response.json()["error"] == {
        "message": "suffix is not supported",
        "type": "invalid_request_error",
        "param": "suffix",
        "code": None,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_request_timeout_is_504_and_aborts(stream: bool) -> None:
    pool = FakePool(["hang"])
    async with client_for(pool, request_timeout=0.05) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": CARD.name, "messages": HI, "stream": stream}
        )
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert len(pool.aborted) == 1


async def test_request_timeout_mid_stream_is_an_error_event() -> None:
    pool = FakePool([Delta(id=0, text="Hel"), "hang"])
    async with client_for(pool, request_timeout=0.05) as client:
        response = await client.post("/v1/chat/completions", json={"model": CARD.name, "messages": HI, "stream": True})
    assert sse_payloads(response)[-1]["error"]["code"] == "timeout"
    assert len(pool.aborted) == 1


# -- disconnects: the ASGI app driven by hand, since an HTTP client cannot hang up mid-request ----


async def call_and_hang_up(app: Starlette, pool: FakePool, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST `body`; once the pool is generating, report http.disconnect. Returns what the app sent."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await pool.hanging.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"tandem")],
        "client": ("127.0.0.1", 1234),
        "server": ("tandem", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_the_first_event_aborts(stream: bool) -> None:
    pool = FakePool(["hang"])
    async with running(pool) as app:
        await call_and_hang_up(app, pool, {"model": CARD.name, "messages": HI, "stream": stream})
    assert len(pool.aborted) == 1


async def test_disconnect_mid_stream_aborts() -> None:
    pool = FakePool([Delta(id=0, text="Hel"), "hang"])
    async with running(pool) as app:
        sent = await call_and_hang_up(app, pool, {"model": CARD.name, "messages": HI, "stream": True})
    assert sent[0]["status"] == 200
    assert b"Hel" in b"".join(m.get("body", b"") for m in sent)
    assert len(pool.aborted) == 1


async def test_disconnect_aborts_every_choice() -> None:
    pool = FakePool(["hang"])
    async with running(pool) as app:
        await call_and_hang_up(app, pool, {"model": CARD.name, "messages": HI, "n": 3})
    assert len(pool.requests) == 3 and len(pool.aborted) == 3


# -- the official SDK ---------------------------------------------------------------------------


async def test_official_sdk_parses_answers_and_chunks() -> None:
    pool = FakePool([Delta(id=0, reasoning="hm"), Delta(id=0, text="Hel"), Delta(id=0, text="lo"), done()])
    async with sdk_for(pool) as sdk:
        completion = await sdk.chat.completions.create(model=CARD.name, messages=HI)  # type: ignore[arg-type]
        chunks = [
            c
            async for c in await sdk.chat.completions.create(
                model=CARD.name,
                messages=HI,
                stream=True,
                stream_options={"include_usage": True},  # type: ignore[arg-type]
            )
        ]
        text = await sdk.completions.create(model=CARD.name, prompt="x")
        models = await sdk.models.list()
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].message.reasoning_content == "hm"  # type: ignore[attr-defined]
    assert completion.usage is not None and completion.usage.total_tokens == 7
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2
    assert text.choices[0].text == "Hello"
    assert [m.id for m in models.data] == [CARD.name]


async def test_official_sdk_raises_the_right_exceptions() -> None:
    async with sdk_for(FakePool()) as sdk:
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="nope", messages=HI)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(model=CARD.name, messages=HI, temperature=5)  # type: ignore[arg-type]
        assert bad.value.param == "temperature"
    async with sdk_for(FakePool([ServerBusy("Server is busy", headers={"Retry-After": "1"})])) as sdk:
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model=CARD.name, messages=HI)  # type: ignore[arg-type]
    async with sdk_for(FakePool([Delta(id=0, text="x"), InternalError("worker crashed")])) as sdk:
        stream = await sdk.chat.completions.create(model=CARD.name, messages=HI, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError, match="worker crashed"):
            async for _ in stream:
                pass


async def test_disconnect_while_the_client_is_not_reading_aborts() -> None:
    """The stream is parked at a `yield` (send is stuck) when the client leaves: closing the body aborts."""
    pool = FakePool([Delta(id=0, text="a"), Delta(id=0, text="b"), "hang"])
    stuck = asyncio.Event()
    messages = [
        {"type": "http.request", "body": json.dumps({"model": CARD.name, "messages": HI, "stream": True}).encode()}
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await stuck.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            stuck.set()
            await asyncio.sleep(3600)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    async with running(pool) as app:
        await asyncio.wait_for(app(scope, receive, send), 5)
    assert not pool.hanging.is_set()  # it never got as far as the hang: the abort came from closing the body
    assert len(pool.aborted) == 1


async def test_official_sdk_parses_tool_calls_whole_and_streamed() -> None:
    tools: Any = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    pool = FakePool([Delta(id=0, tool_calls=[CALL]), done(reason="tool_calls")])
    async with sdk_for(pool) as sdk:
        completion = await sdk.chat.completions.create(
            model=CARD.name,
            messages=HI,  # type: ignore[arg-type]
            tools=tools,
            tool_choice="required",
        )
        chunks = [
            c
            async for c in await sdk.chat.completions.create(
                model=CARD.name,
                messages=HI,  # type: ignore[arg-type]
                tools=tools,
                stream=True,
            )
        ]
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("call_1", "function", "weather")  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert pool.requests[0].force_tool_call == ForcedToolCall() and pool.requests[1].force_tool_call is None
    # A client folds the fragments by index, as the SDK's own stream helpers do.
    folded: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for fragment in chunk.choices[0].delta.tool_calls or []:
            entry = folded.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += fragment.id or ""
            entry["name"] += (fragment.function and fragment.function.name) or ""
            entry["arguments"] += (fragment.function and fragment.function.arguments) or ""
    assert folded == {0: {"id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}'}}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_response_format_reaches_the_worker_and_bad_types_are_400() -> None:
    pool = FakePool([Delta(id=0, text='{"city": "Paris"}'), done()])
    schema = {"name": "city", "schema": SCHEMA, "strict": True}
    async with client_for(pool) as client:
        ok = await client.post(
            "/v1/chat/completions",
            json={
                "model": CARD.name,
                "messages": HI,
                "response_format": {"type": "json_schema", "json_schema": schema},
            },
        )
        bad = await client.post(
            "/v1/chat/completions", json={"model": CARD.name, "messages": HI, "response_format": {"type": "xml"}}
        )
    assert ok.status_code == 200 and json.loads(ok.json()["choices"][0]["message"]["content"]) == {"city": "Paris"}
    assert pool.requests[0].params.json_schema == msgspec.json.encode(SCHEMA).decode()
    assert bad.status_code == 400 and bad.json()["error"] == {
        "message": "Invalid enum value 'xml' - at `$.response_format.type`",
        "type": "invalid_request_error",
        "param": "response_format.type",
        "code": None,
    }


async def test_x_request_id_is_echoed_or_made() -> None:
    async with client_for(FakePool()) as client:
        echoed = await client.post(
            "/v1/chat/completions", json={"model": CARD.name, "messages": HI}, headers={"x-request-id": "req-42"}
        )
        made = await client.get("/v1/models")
        failed = await client.get("/v1/models/nope", headers={"x-request-id": "req-43"})
    assert echoed.headers["x-request-id"] == "req-42"
    assert len(made.headers["x-request-id"]) == 32
    assert failed.status_code == 404 and failed.headers["x-request-id"] == "req-43"
