"""The Ollama dialect without a model: golden translations and shapes, then the endpoints on a scripted pool.

Shapes follow Ollama's API reference (docs/api.md): /api/chat, /api/generate, /api/tags, /api/ps, /api/show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import httpx
import msgspec
import ollama
import pytest
from fake_pool import ScriptedPool, Step
from starlette.applications import Starlette

from common.protocol import (
    ChatMessage,
    Delta,
    Done,
    Generate,
    GenerationDefaults,
    Logprob,
    ModelCard,
    SamplingParams,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolCallFunction,
    Usage,
)
from gateway import ollama as dialect
from gateway import ollama_models
from gateway import ollama_models as models
from gateway import ollama_requests as requests
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.errors import (
    BadRequest,
    ContextLengthExceeded,
    GatewayError,
    InternalError,
    ModelNotFound,
    RequestTimeout,
    ServerBusy,
    Unavailable,
)
from gateway.streaming import Folded

pytestmark = pytest.mark.anyio

CARD = ModelCard(
    name="SmolLM2-135M-Instruct",
    context_length=8192,
    architecture="llama",
    num_parameters=134_515_008,
    size_bytes=145_000_000,
    quantization="Q8_0",
    chat_template="{{ messages }}",
    capabilities=["completion", "tools", "thinking"],
    family="llama",
    format="gguf",
)
HI = [{"role": "user", "content": "hi"}]
# Ollama's own sampler defaults, applied when a request sends no options
SERVER_CAP = GatewayConfig.default_max_tokens  # the output limit of a request that sets none, its model neither
OLLAMA_DEFAULTS = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=SERVER_CAP)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the gateway is asyncio code


# -- a scripted stand-in for WorkerPool ---------------------------------------------------------

TIMINGS = Timings(queue=0.001, prefill=0.25, decode=1.5, load=2.0)


def done(prompt: int = 5, completion: int = 2, reason: str = "stop") -> Done:
    return Done(id=0, finish_reason=reason, usage=Usage(prompt, completion), timings=TIMINGS)  # type: ignore[arg-type]


HELLO: list[Step] = [Delta(id=0, text="Hel"), Delta(id=0, text="lo"), done()]


class FakePool(ScriptedPool):
    """The scripted pool serving this module's CARD, by default answering "Hello"."""

    def __init__(self, script: Callable[[Generate], list[Step]] | list[Step] = HELLO) -> None:
        super().__init__(CARD, script)


@contextlib.asynccontextmanager
async def running(pool: FakePool, **config: Any) -> AsyncIterator[Starlette]:
    app = create_app(GatewayConfig(workers=(), version="0.9.1", **config), pool=pool)  # type: ignore[arg-type]
    async with app.router.lifespan_context(app):
        yield app


@contextlib.asynccontextmanager
async def client_for(pool: FakePool, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with running(pool, **config) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tandem") as client:
            yield client


@contextlib.asynccontextmanager
async def sdk_for(pool: FakePool) -> AsyncIterator[ollama.AsyncClient]:
    async with running(pool) as app:
        yield ollama.AsyncClient(host="http://tandem", transport=httpx.ASGITransport(app=app))


def ndjson_lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.removesuffix("\n").split("\n")]


def chat_request(**fields: Any) -> requests.ChatRequest:
    return msgspec.json.decode(json.dumps({"model": CARD.name, "messages": HI, **fields}), type=requests.ChatRequest)


def generate_request(**fields: Any) -> requests.GenerateRequest:
    return msgspec.json.decode(
        json.dumps({"model": CARD.name, "prompt": "Why?", **fields}), type=requests.GenerateRequest
    )


# -- translation --------------------------------------------------------------------------------


def test_minimal_chat_uses_ollama_sampler_defaults() -> None:
    assert requests.to_generate(chat_request(), CARD) == Generate(
        id=0, model=CARD.name, params=OLLAMA_DEFAULTS, messages=[ChatMessage(role="user", content="hi")]
    )


def test_every_chat_field_maps_onto_generate() -> None:
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    body = chat_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?", "images": []},
            {
                "role": "assistant",
                "content": "",
                "thinking": "call the tool",
                "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ],
        options={
            "temperature": 0.2,
            "top_p": 0.5,
            "top_k": 10,
            "min_p": 0.1,
            "num_predict": 64,
            "seed": 3,
            "stop": ["\n\n"],
            "repeat_penalty": 1.3,
            "presence_penalty": 0.4,
            "frequency_penalty": 0.6,
            "num_ctx": 4096,
            "repeat_last_n": 64,
            "mirostat": 0,
        },
        think=True,
        tools=tools,
        keep_alive="5m",
        format="",
        logprobs=True,
        top_logprobs=2,
        stream=False,
    )
    assert requests.to_generate(body, CARD) == Generate(
        id=0,
        model=CARD.name,
        params=SamplingParams(
            temperature=0.2,
            top_p=0.5,
            top_k=10,
            min_p=0.1,
            seed=3,
            repetition_penalty=1.3,
            presence_penalty=0.4,
            frequency_penalty=0.6,
            max_tokens=64,
            stop=["\n\n"],
            logprobs=2,
        ),
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Weather?"),
            ChatMessage(
                role="assistant",
                content="",
                tool_calls=[ToolCall(function=ToolCallFunction(name="weather", arguments={"city": "Paris"}))],
                reasoning="call the tool",
            ),
            ChatMessage(role="tool", content="sunny", name="weather"),
        ],
        tools=tools,
        think=True,
    )


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"num_predict": -1}, None),
        ({"num_predict": -2}, None),
        ({"num_predict": 0}, None),
        ({"num_predict": 5}, 5),
        ({}, SERVER_CAP),
    ],
)
def test_num_predict(options: dict[str, Any], expected: int | None) -> None:
    assert requests.to_generate(chat_request(options=options), CARD).params.max_tokens == expected


def test_option_edge_values() -> None:
    params = requests.to_generate(
        chat_request(options={"seed": -1, "top_k": 0, "repeat_penalty": 0, "stop": "x"}), CARD
    ).params
    assert (params.seed, params.top_k, params.repetition_penalty, params.stop) == (None, 0, 1.0, ["x"])
    assert requests.to_generate(chat_request(options=None), CARD).params == OLLAMA_DEFAULTS


@pytest.mark.parametrize(
    ("think", "expected", "kwargs"),
    [
        (True, True, {}),
        (False, False, {}),
        ("low", True, {"reasoning_effort": "low"}),
        ("medium", True, {"reasoning_effort": "medium"}),
        ("high", True, {"reasoning_effort": "high"}),
        (None, None, {}),
    ],
)
def test_think_levels(think: Any, expected: bool | None, kwargs: dict[str, Any]) -> None:
    generate = requests.to_generate(chat_request(think=think), CARD)
    assert (generate.think, generate.template_kwargs) == (expected, kwargs)


def test_generate_templated_and_raw() -> None:
    assert requests.to_generate(generate_request(system="Be brief.", context=[1, 2, 3]), CARD) == Generate(
        id=0,
        model=CARD.name,
        params=OLLAMA_DEFAULTS,
        messages=[ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Why?")],
    )
    raw = requests.to_generate(generate_request(raw=True, system="ignored when raw"), CARD)
    assert (raw.prompt, raw.messages) == ("Why?", None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            chat_request(messages=[{"role": "user", "content": "x", "images": ["aGk="]}]),
            "messages[0].images: images are not supported: the served models read text only",
        ),
        (chat_request(format="yaml"), 'invalid format: "yaml"; expected "json" or a valid JSON Schema'),
        (generate_request(format=[1]), 'invalid format: [1]; expected "json" or a valid JSON Schema'),
        (chat_request(think=True), '"SmolLM2-135M-Instruct" does not support thinking'),
        (generate_request(suffix="end"), "suffix is not supported"),
        (generate_request(images=["aGk="]), "images are not supported: the served models read text only"),
        (generate_request(template="{{ .Prompt }}"), "a per-request template is not supported"),
    ],
)
def test_unsupported_inputs_are_clear_400s(body: Any, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        requests.to_generate(body, msgspec.structs.replace(CARD, capabilities=["completion"]))
    assert (caught.value.message, caught.value.status) == (message, 400)


@pytest.mark.parametrize(
    ("format_", "json_schema"),
    [
        (None, None),
        ("", None),
        ("json", '{"type":"object"}'),  # Ollama's JSON grammar: an object
        (
            {"type": "object", "properties": {"a": {"type": "integer"}}},
            '{"type":"object","properties":{"a":{"type":"integer"}}}',
        ),
    ],
)
def test_format_becomes_a_json_schema(format_: Any, json_schema: str | None) -> None:
    assert requests.to_generate(chat_request(format=format_), CARD).params.json_schema == json_schema
    assert requests.to_generate(generate_request(format=format_), CARD).params.json_schema == json_schema


def test_tools_for_a_model_without_the_capability_are_ignored_unless_strict() -> None:
    plain = msgspec.structs.replace(CARD, capabilities=["completion"])
    body = chat_request(tools=[{"type": "function", "function": {"name": "f"}}])
    assert requests.to_generate(body, plain).tools is None  # chat UIs send their tools with every request
    with pytest.raises(BadRequest, match="does not support tools"):
        requests.to_generate(body, plain, GatewayConfig(workers=(), strict_tools=True))
    assert requests.to_generate(body, CARD).tools == [{"type": "function", "function": {"name": "f"}}]


def test_the_models_defaults_fill_what_the_request_leaves_unset() -> None:
    defaults = GenerationDefaults(temperature=0.6, top_k=20, max_tokens=300, stop=["<end>"], repetition_penalty=1.1)
    tuned = msgspec.structs.replace(CARD, defaults=defaults)
    params = requests.to_generate(chat_request(options={"top_k": 5}), tuned).params
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 5, 300)
    assert (params.stop, params.repetition_penalty) == (["<end>"], 1.1)
    assert requests.to_generate(chat_request(options={"num_predict": -1}), tuned).params.max_tokens is None
    no_cap = GatewayConfig(workers=(), default_max_tokens=None)
    assert requests.to_generate(chat_request(), CARD, no_cap).params.max_tokens is None
    assert ollama_models.parameters(defaults).splitlines() == [
        "temperature                    0.6",
        "top_k                          20",
        "repeat_penalty                 1.1",
        "num_predict                    300",
        'stop                           "<end>"',
    ]


# -- renderers ----------------------------------------------------------------------------------

AT = "2024-04-11T16:50:07.123456Z"
METRICS = {
    "done_reason": "stop",
    "done": True,
    "total_duration": 4_000_000_000,
    "load_duration": 2_000_000_000,
    "prompt_eval_count": 5,
    "prompt_eval_duration": 250_000_000,
    "eval_count": 2,
    "eval_duration": 1_500_000_000,
}


def test_timestamp_is_rfc3339_with_microseconds() -> None:
    assert dialect.timestamp(1712854207.123456) == AT
    datetime.fromisoformat(dialect.timestamp().replace("Z", "+00:00"))


def test_chat_chunk_and_final() -> None:
    assert dialect.chat_chunk("smol", AT, Delta(id=0, text="Hi")) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": "Hi"},
        "done": False,
    }
    assert dialect.chat_chunk("smol", AT, Delta(id=0, reasoning="hm")) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": "", "thinking": "hm"},
        "done": False,
    }
    assert dialect.chat_final("smol", AT, done(), 4_000_000_000) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": ""},
        **METRICS,
    }
    answer = Folded(parts=["Hel", "lo"], reasoning_parts=["hm"], done=done(reason="length"))
    assert dialect.chat_final("smol", AT, done(reason="length"), 4_000_000_000, answer) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": "Hello", "thinking": "hm"},
        **METRICS,
        "done_reason": "length",
    }


CALL = ToolCall(id="call_1", function=ToolCallFunction(name="weather", arguments={"city": "Paris"}))
OLLAMA_CALL = {"function": {"name": "weather", "arguments": {"city": "Paris"}}}


def test_tool_calls_in_chunk_and_final() -> None:
    assert dialect.chat_chunk("smol", AT, Delta(id=0, tool_calls=[CALL])) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
        "done": False,
    }
    answer = Folded(tool_calls=[CALL], done=done(reason="tool_calls"))
    assert dialect.chat_final("smol", AT, done(reason="tool_calls"), 4_000_000_000, answer) == {
        "model": "smol",
        "created_at": AT,
        "message": {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
        **METRICS,  # done_reason "stop", as Ollama ends a tool-call answer
    }


def test_generate_chunk_and_final() -> None:
    assert dialect.generate_chunk("smol", AT, Delta(id=0, text="Hi", reasoning="hm")) == {
        "model": "smol",
        "created_at": AT,
        "response": "Hi",
        "thinking": "hm",
        "done": False,
    }
    assert dialect.generate_final("smol", AT, done(), 4_000_000_000) == {
        "model": "smol",
        "created_at": AT,
        "response": "",
        **METRICS,
    }
    answer = Folded(parts=["Hello"], done=done())
    assert dialect.generate_final("smol", AT, done(), 4_000_000_000, answer)["response"] == "Hello"


def test_logprobs_shape() -> None:
    item = Logprob(
        token="Hi", logprob=-0.5, bytes=[72, 105], top=[TokenLogprob("Hi", -0.5, [72, 105]), TokenLogprob("Yo", -1.5)]
    )
    assert dialect.chat_chunk("smol", AT, Delta(id=0, text="Hi", logprobs=[item]))["logprobs"] == [
        {
            "token": "Hi",
            "logprob": -0.5,
            "bytes": [72, 105],
            "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}, {"token": "Yo", "logprob": -1.5}],
        }
    ]


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (134_515_008, "134.52M"),
        (8_030_261_248, "8.0B"),
        (7_000_000_000, "7B"),
        (360_000_000, "360M"),
        (500, "500"),
        (12_345, "12K"),
    ],
)
def test_parameter_size_like_ollama(count: int, expected: str) -> None:
    assert models.parameter_size(count) == expected


DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "134.52M",
    "quantization_level": "Q8_0",
}


def test_tag_ps_and_show_shapes() -> None:
    digest = models.digest(CARD)
    assert len(digest) == 64 and digest == models.digest(CARD)
    assert models.tag(CARD, AT) == {
        "name": CARD.name + ":latest",
        "model": CARD.name + ":latest",
        "modified_at": AT,
        "size": 145_000_000,
        "digest": digest,
        "details": DETAILS,
    }
    assert models.running(CARD, None) == {
        "name": CARD.name + ":latest",
        "model": CARD.name + ":latest",
        "size": 145_000_000,
        "digest": digest,
        "details": DETAILS,
        "expires_at": "2318-01-01T00:00:00Z",
        "size_vram": 145_000_000,
        "context_length": 8192,
    }
    assert models.show(CARD, AT) == {
        "license": "",
        "modelfile": f"# Modelfile generated by tandem\nFROM {CARD.name}:latest\n",
        "parameters": "",
        "template": "{{ messages }}",
        "details": DETAILS,
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": 134_515_008,
            "llama.context_length": 8192,
        },
        "capabilities": ["completion", "tools", "thinking"],
        "modified_at": AT,
    }


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (BadRequest("bad"), 400, "bad"),
        (ContextLengthExceeded("Prompt exceeds the context length"), 400, "Prompt exceeds the context length"),
        (ModelNotFound("nope"), 404, "model 'nope' not found"),
        (ServerBusy("busy", headers={"Retry-After": "1"}), 503, "server busy, please try again"),
        (InternalError("oops"), 500, "oops"),
        (Unavailable("down"), 503, "down"),
        (RequestTimeout("slow"), 504, "slow"),
    ],
)
def test_error_bodies(error: GatewayError, status: int, message: str) -> None:
    response = dialect.render_error(error)
    assert (response.status_code, json.loads(response.body)) == (status, {"error": message})


# -- endpoints on a scripted pool ---------------------------------------------------------------


async def test_root_version_tags_ps_show() -> None:
    async with client_for(FakePool()) as client:
        root = await client.get("/")
        head = await client.head("/")
        heads = [(await client.head(path)).status_code for path in ("/api/version", "/api/tags", "/api/ps")]
        version = await client.get("/api/version")
        tags = await client.get("/api/tags")
        ps = await client.get("/api/ps")
        show = await client.post("/api/show", json={"model": CARD.name + ":latest"})
        show_by_name = await client.post("/api/show", json={"name": CARD.name})
        missing = await client.post("/api/show", json={"model": "nope"})
    assert (root.status_code, root.text, root.headers["content-type"]) == (
        200,
        "Ollama is running",
        "text/plain; charset=utf-8",
    )
    assert head.status_code == 200 and heads == [200, 200, 200]
    assert version.json() == {"version": "0.9.1"}
    assert tags.json()["models"][0]["name"] == CARD.name + ":latest" and tags.json()["models"][0]["details"] == DETAILS
    assert ps.json()["models"][0]["context_length"] == 8192
    assert show.json()["capabilities"] == ["completion", "tools", "thinking"] and show_by_name.status_code == 200
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope' not found"})


async def test_chat_streams_ndjson_by_default() -> None:
    async with client_for(FakePool([Delta(id=0, reasoning="hm"), *HELLO])) as client:
        response = await client.post("/api/chat", json={"model": CARD.name + ":latest", "messages": HI})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson_lines(response)
    assert [line["message"] for line in lines] == [
        {"role": "assistant", "content": "", "thinking": "hm"},
        {"role": "assistant", "content": "Hel"},
        {"role": "assistant", "content": "lo"},
        {"role": "assistant", "content": ""},
    ]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert all(line["model"] == CARD.name + ":latest" for line in lines)
    final = lines[-1]
    assert final["done_reason"] == "stop" and final["eval_count"] == 2 and final["prompt_eval_count"] == 5
    assert final["total_duration"] > 0 and final["eval_duration"] == 1_500_000_000
    for line in lines:
        datetime.fromisoformat(line["created_at"].replace("Z", "+00:00"))


async def test_chat_not_streamed() -> None:
    async with client_for(FakePool()) as client:
        response = await client.post("/api/chat", json={"model": CARD.name, "messages": HI, "stream": False})
    body = response.json()
    assert response.headers["content-type"] == "application/json"
    assert body["message"] == {"role": "assistant", "content": "Hello"}
    assert {k: v for k, v in body.items() if k not in ("created_at", "total_duration")} == {
        "model": CARD.name,
        "message": {"role": "assistant", "content": "Hello"},
        **{k: v for k, v in METRICS.items() if k != "total_duration"},
    }


async def test_generate_streamed_and_not() -> None:
    pool = FakePool()
    async with client_for(pool) as client:
        lines = ndjson_lines(await client.post("/api/generate", json={"model": CARD.name, "prompt": "Why?"}))
        whole = (
            await client.post(
                "/api/generate", json={"model": CARD.name, "prompt": "Why?", "raw": True, "stream": False}
            )
        ).json()
    assert [line["response"] for line in lines] == ["Hel", "lo", ""]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert whole["response"] == "Hello" and whole["done"] is True
    assert pool.requests[0].messages == [ChatMessage(role="user", content="Why?")]
    assert pool.requests[1].prompt == "Why?"


async def test_empty_prompt_or_messages_loads_the_model() -> None:
    pool = FakePool()
    async with client_for(pool) as client:
        generate = (await client.post("/api/generate", json={"model": CARD.name})).json()
        unload = (await client.post("/api/generate", json={"model": CARD.name, "keep_alive": 0})).json()
        chat = (await client.post("/api/chat", json={"model": CARD.name, "messages": []})).json()
        missing = await client.post("/api/generate", json={"model": "nope"})
    assert {k: v for k, v in generate.items() if k != "created_at"} == {
        "model": CARD.name,
        "response": "",
        "done_reason": "load",
        "done": True,
    }
    assert unload["done_reason"] == "unload" and pool.unloaded == [CARD.name]
    assert chat["message"] == {"role": "assistant", "content": ""} and chat["done_reason"] == "load"
    assert missing.status_code == 404
    assert pool.requests == []


async def test_errors_in_ollama_shape() -> None:
    async with client_for(FakePool([ServerBusy("busy", headers={"Retry-After": "1"})])) as client:
        busy = await client.post("/api/chat", json={"model": CARD.name, "messages": HI})
        unknown = await client.post("/api/chat", json={"model": "nope", "messages": HI})
        malformed = await client.post("/api/chat", content=b'{"model": ')
        hot = await client.post(
            "/api/chat", json={"model": CARD.name, "messages": HI, "options": {"temperature": "hot"}}
        )
        images = await client.post(
            "/api/chat", json={"model": CARD.name, "messages": [{"role": "user", "images": ["x"]}]}
        )
    assert (busy.status_code, busy.json()) == (503, {"error": "server busy, please try again"})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "model 'nope' not found"})
    assert malformed.status_code == 400 and malformed.json()["error"].startswith("Request body is not valid JSON")
    assert hot.status_code == 400 and hot.json()["error"].endswith("got `str` - at `$.options.temperature`")
    assert images.status_code == 400


async def test_mid_stream_failure_is_one_error_line() -> None:
    async with client_for(FakePool([Delta(id=0, text="Hel"), InternalError("worker crashed")])) as client:
        lines = ndjson_lines(await client.post("/api/chat", json={"model": CARD.name, "messages": HI}))
    assert lines[-1] == {"error": "worker crashed"} and len(lines) == 2


async def test_timeout_and_disconnect_abort() -> None:
    pool = FakePool([Delta(id=0, text="Hel"), "hang"])
    async with client_for(pool, request_timeout=0.05) as client:
        lines = ndjson_lines(await client.post("/api/generate", json={"model": CARD.name, "prompt": "x"}))
    assert lines[-1] == {"error": "The request ran longer than the server's limit of 0.05s and was stopped"}
    assert len(pool.aborted) == 1

    pool = FakePool(["hang"])
    sent: list[dict[str, Any]] = []
    body = [
        {"type": "http.request", "body": json.dumps({"model": CARD.name, "messages": HI, "stream": False}).encode()}
    ]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await pool.hanging.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/chat",
        "headers": [],
        "query_string": b"",
        "http_version": "1.1",
    }
    async with running(pool) as app:
        await asyncio.wait_for(app(scope, receive, send), 5)
    assert len(pool.aborted) == 1


# -- the official client ------------------------------------------------------------------------


async def test_official_client_parses_everything() -> None:
    pool = FakePool([Delta(id=0, reasoning="hm"), *HELLO])
    async with sdk_for(pool) as client:
        listed = await client.list()
        shown = await client.show(CARD.name)
        ps = await client.ps()
        whole = await client.chat(model=CARD.name, messages=HI)
        parts = [part async for part in await client.chat(model=CARD.name, messages=HI, stream=True)]
        generated = await client.generate(model=CARD.name, prompt="Why?")
        with pytest.raises(ollama.ResponseError) as missing:
            await client.chat(model="nope", messages=HI)
    assert listed.models[0].model == CARD.name + ":latest" and listed.models[0].details is not None
    assert listed.models[0].details.parameter_size == "134.52M"
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert ps.models[0].context_length == 8192
    assert whole.message.content == "Hello" and whole.message.thinking == "hm" and whole.done_reason == "stop"
    assert whole.eval_count == 2 and whole.eval_duration == 1_500_000_000
    assert "".join(p.message.content or "" for p in parts) == "Hello" and parts[-1].done
    assert generated.response == "Hello"
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"


async def test_official_client_raises_on_mid_stream_error() -> None:
    async with sdk_for(FakePool([Delta(id=0, text="x"), InternalError("worker crashed")])) as client:
        with pytest.raises(ollama.ResponseError, match="worker crashed"):
            async for _ in await client.chat(model=CARD.name, messages=HI, stream=True):
                pass


async def test_official_client_parses_tool_calls() -> None:
    tools: Any = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    history: Any = [
        *HI,
        {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
        {"role": "tool", "content": "sunny", "tool_name": "weather"},
    ]
    pool = FakePool([Delta(id=0, tool_calls=[CALL]), done(reason="tool_calls")])
    async with sdk_for(pool) as client:
        whole = await client.chat(model=CARD.name, messages=history, tools=tools)
        parts = [part async for part in await client.chat(model=CARD.name, messages=HI, tools=tools, stream=True)]
    assert whole.message.tool_calls is not None and whole.done_reason == "stop"
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls] == [
        ("weather", {"city": "Paris"})
    ]
    streamed = [c for part in parts for c in part.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("weather", {"city": "Paris"})]
    assert pool.requests[0].messages == [
        ChatMessage(role="user", content="hi"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(function=ToolCallFunction(name="weather", arguments={"city": "Paris"}))],
        ),
        ChatMessage(role="tool", content="sunny", name="weather"),
    ]


async def test_format_reaches_the_worker() -> None:
    pool = FakePool([Delta(id=0, text="{}"), done()])
    async with sdk_for(pool) as client:
        await client.chat(model=CARD.name, messages=HI, format="json")
        await client.generate(model=CARD.name, prompt="Why?", format={"type": "object"})
    assert [r.params.json_schema for r in pool.requests] == ['{"type":"object"}', '{"type":"object"}']
