"""Random and adversarial request bodies for every route of both dialects, and the properties every answer must
have. Shared by the bounded run in the test suite (tests/unit/test_fuzz.py) and the long run (bench/fuzz.py).

Bodies are mostly mutations of a valid request — one to three fields replaced by hostile values, unknown fields
added — so that they get past the first check and reach the deep ones; the rest are raw bytes: broken JSON,
invalid UTF-8, deep nesting, huge arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import strategies as st

MODEL = "tiny"  # replaced by the served model's name at run time (`Route.body` takes it)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    dialect: str  # "openai", "ollama" or "seed" (FastAPI's {"detail": …}): the error shape its answers must have
    base: dict[str, Any]  # a valid body ({} for GET); "$model" stands for the served model's name
    fields: tuple[str, ...]  # the fields worth attacking (nested ones as "options.seed")
    refused: int | None = None  # a route tandem refuses by design: this status (and the error shape) for every body

    def body(self, model: str) -> dict[str, Any]:
        return json.loads(json.dumps(self.base).replace('"$model"', json.dumps(model)))


HI = [{"role": "user", "content": "Hi"}]
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "max_tokens", "presence_penalty",
            "frequency_penalty", "logit_bias", "repetition_penalty", "stop_token_ids", "ignore_eos", "stream",
            "stream_options", "logprobs")  # fmt: skip
OLLAMA_OPTIONS = ("options.temperature", "options.top_p", "options.top_k", "options.min_p", "options.seed",
                  "options.num_predict", "options.stop", "options.repeat_penalty", "options.presence_penalty",
                  "options.num_ctx", "options")  # fmt: skip
ROUTES = (
    Route("POST", "/v1/chat/completions", "openai", {"model": "$model", "messages": HI, "max_tokens": 4},
          ("model", "messages", "messages.0", "messages.0.role", "messages.0.content", "messages.0.tool_calls",
           "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
           "chat_template_kwargs", "reasoning_effort", *SAMPLING)),
    Route("POST", "/v1/completions", "openai", {"model": "$model", "prompt": "Hi", "max_tokens": 4},
          ("model", "prompt", "echo", "suffix", "best_of", *SAMPLING)),
    Route("POST", "/api/chat", "ollama", {"model": "$model", "messages": HI, "stream": False,
                                          "options": {"num_predict": 4}},
          ("model", "messages", "messages.0.role", "messages.0.content", "messages.0.images", "tools", "format",
           "think", "keep_alive", "logprobs", "top_logprobs", "stream", *OLLAMA_OPTIONS)),
    Route("POST", "/api/generate", "ollama", {"model": "$model", "prompt": "Hi", "stream": False,
                                              "options": {"num_predict": 4}},
          ("model", "prompt", "system", "raw", "suffix", "template", "images", "context", "format", "think",
           "stream", *OLLAMA_OPTIONS)),
    Route("POST", "/api/show", "ollama", {"model": "$model"}, ("model", "name", "verbose")),
    Route("POST", "/api/pull", "ollama", {"model": "$model", "stream": False}, ("model", "name", "stream", "insecure")),
    Route("POST", "/v1/load_lora_adapter", "openai", {"lora_name": "fuzz", "lora_path": "/nonexistent/adapter"},
          ("lora_name", "lora_path", "base_model_name", "load_inplace")),
    Route("POST", "/v1/unload_lora_adapter", "openai", {"lora_name": "fuzz"}, ("lora_name", "lora_int_id")),
    # Ollama's model-changing routes: 501 (Not Implemented, on purpose: tandem never changes its models) to any body
    Route("POST", "/api/copy", "ollama", {"source": "$model", "destination": "copy"}, ("source", "destination"),
          refused=501),
    Route("POST", "/api/create", "ollama", {"model": "new", "from": "$model"},
          ("model", "from", "files", "adapters", "template", "system", "parameters", "messages", "quantize", "stream"),
          refused=501),
    Route("DELETE", "/api/delete", "ollama", {"model": "$model"}, ("model", "name"), refused=501),
    Route("POST", "/api/push", "ollama", {"model": "$model", "stream": False}, ("model", "name", "insecure", "stream"),
          refused=501),
    Route("POST", "/v1/embeddings", "openai", {"model": "$model", "input": "Hi"},
          ("model", "input", "encoding_format", "dimensions", "keep_alive")),
    Route("POST", "/api/embed", "ollama", {"model": "$model", "input": ["Hi"]},
          ("model", "input", "truncate", "dimensions", "keep_alive", "options")),
    Route("POST", "/api/embeddings", "ollama", {"model": "$model", "prompt": "Hi"}, ("model", "prompt")),
    # The seed services' routes (gateway/qwen3_service.py, thinking_service.py, qwen_chat.py, llamafactory.py)
    Route("POST", "/api/v1/chat", "seed", {"message": "Hi", "history": []},
          ("message", "history", "history.0", "history.0.role")),
    Route("POST", "/api/v1/chat/stream", "seed", {"message": "Hi"}, ("message", "history")),
    Route("POST", "/api/v1/model/load", "seed", {}, ("model_name",)),
    Route("POST", "/generate", "seed", {"prompt": "Hi", "max_tokens": 4},
          ("prompt", "max_length", "max_tokens", "temperature", "top_p", "do_sample", "stream")),
    Route("POST", "/thinking", "seed", {"question": "Why?", "thinking_depth": 1},
          ("question", "thinking_depth", "include_reasoning")),
    Route("POST", "/batch_generate", "seed", {"prompts": ["Hi", "Yo"], "max_tokens": 4},
          ("prompts", "prompts.0", "max_length", "max_tokens", "temperature")),
    Route("POST", "/", "seed", {"prompt": "Hi", "history": [], "max_length": 40},
          ("prompt", "history", "history.0", "max_length", "top_p", "temperature")),
    Route("POST", "/chat", "seed", {"messages": HI, "max_tokens": 4},
          ("messages", "messages.0.role", "max_tokens", "temperature", "top_p", "stream")),
    Route("POST", "/batch", "seed", {"prompts": ["Hi"], "max_tokens": 4}, ("prompts", "max_tokens", "top_p")),
)  # fmt: skip

# Values that have broken servers: numbers past 64 bits, extremes of float, empty and odd strings, wrong types.
EDGE_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1, 1e308, -1e308,
                                1e-320, 0.5, -0.0, 3.4e38])  # fmt: skip
EDGE_STRINGS = st.sampled_from(["", " ", "\x00", "\ud7ff", "\U0010ffff", "a" * 5000, "<think>", "</tool_call>",
                                "{{ raise('x') }}", "{% for x in range(10**9) %}", "🦙" * 50, "null", "-1",
                                "18446744073709551616", "\u202e\u0000\ufffd"])  # fmt: skip
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    EDGE_NUMBERS,
    EDGE_STRINGS,
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=24,
)

class Raw(bytes):
    """A raw body whose repr stays short: a falsifying example of 200 kB would drown the report."""

    def __repr__(self) -> str:
        head = bytes(self[:60])
        return f"Raw({head!r}{'…' if len(self) > 60 else ''}, {len(self)} bytes)"


RAW_BODIES = st.sampled_from([Raw(body) for body in [
    b"", b"{", b"[]", b"null", b"42", b'"text"', b"{\"model\": }", b"\xff\xfe\x00", b'{"model": "\xc3\x28"}',
    b'{"model": "m", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # a UTF-8-encoded surrogate
    b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"model": "m", "messages": [' + b'{"role": "user", "content": "x"},' * 50_000 + b'{"role": "user"}]}',
    b'{"model": "m", "temperature": NaN}', b'{"model": "m", "temperature": Infinity}', b'{"model": "m", "n": 1e999}',
    b'{"model": "m", "model": "m"}', b"\x00" * 1000,
]])  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, route: Route, model: str) -> dict[str, Any]:
    """A valid body of `route` with one to three of its fields replaced (or removed), and maybe unknown ones."""
    body = route.body(model)
    for path in draw(st.lists(st.sampled_from(route.fields), min_size=1, max_size=3, unique=True)):
        _set(body, path.split("."), draw(st.one_of(VALUES, st.just(_DELETE))))
    if draw(st.booleans()):
        body[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    return body


_DELETE = object()


def _set(body: Any, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        index: Any = int(key) if isinstance(body, list) and key.isdigit() else key
        if isinstance(body, list) and not (isinstance(index, int) and index < len(body)):
            return
        if isinstance(body, dict) and not isinstance(body.get(index), dict | list):
            body[index] = {}
        body = body[index]
    last: Any = keys[-1]
    if isinstance(body, list):
        if last.isdigit() and int(last) < len(body):
            body[int(last)] = None if value is _DELETE else value
    elif isinstance(body, dict):
        if value is _DELETE:
            body.pop(last, None)
        else:
            body[last] = value


def encoded(body: Any) -> bytes:
    """JSON the way a client would send it; Python ints of any size stay exact."""
    return json.dumps(body, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


def check_answer(route: Route, response: httpx.Response) -> None:
    """The properties every answer has: no 5xx (a refused route: its one status); an error is the dialect's JSON error
    shape; a stream is framed."""
    status, text = response.status_code, response.text
    if route.refused is not None:
        assert status == route.refused, f"{route.path}: {status} {text[:500]}"
    else:
        assert status < 500, f"{route.path}: {status} {text[:500]}"
    if status >= 400:
        body = response.json()
        if route.dialect == "openai":
            assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
        elif route.dialect == "ollama":
            assert set(body) == {"error"} and isinstance(body["error"], str), body
        else:
            assert set(body) == {"detail"}, body
        return
    kind = response.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        events = [line for line in text.split("\n\n") if line]
        assert events and all(event.startswith("data: ") for event in events), text[:500]
        payloads = [json.loads(event[6:]) for event in events if event != "data: [DONE]"]
        if route.dialect == "openai":
            assert events[-1] == "data: [DONE]" or "error" in payloads[-1], events[-1]
        elif route.path == "/api/v1/chat/stream":  # seed 000's events: start, chunks, then end or error
            assert payloads[-1]["type"] in ("end", "error"), payloads[-1]
    elif kind.startswith("application/x-ndjson"):
        lines = [json.loads(line) for line in text.splitlines() if line]
        ends = lines[-1].get("status") == "success" if route.path == "/api/pull" else lines[-1].get("done") is True
        assert lines and (ends or "error" in lines[-1]), lines[-1:]
    elif kind.startswith("text/plain"):  # vLLM's LoRA routes answer success as a line of text
        assert text.startswith("Success: "), text[:500]
    else:
        json.loads(text)
