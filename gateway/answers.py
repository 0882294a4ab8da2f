"""The answers of the OpenAI and Ollama routes and of tandem's own, as msgspec types, for the OpenAPI document.

The renderers build these answers as dicts (the hot path); the unit tests convert real rendered answers into these
types with unknown fields forbidden, so the document cannot drift from what the routes send.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct


class Doc(Struct, forbid_unknown_fields=True):
    """Every answer type: a field the renderer sends and the type lacks fails the tests."""


# -- OpenAI -------------------------------------------------------------------------------------


class Usage(Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # cached_tokens


class AssistantMessage(Doc):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # the thinking, where the model thinks
    reasoning: str | None = None  # the same, with the gateway's --reasoning-field
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(Doc):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort"]


class ChatCompletion(Doc):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(Doc):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "abort"]


class Completion(Doc):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    capabilities: list[str]  # tandem's: "completion", "tools", "thinking", "embedding"
    parent: str | None = None  # a LoRA adapter's base model (vLLM's)


class EmbeddingItem(Doc):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # float, or base64 (float32 little-endian)


class EmbeddingUsage(Doc):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Doc):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class ModelList(Doc):
    object: Literal["list"]
    data: list[Model]


class OpenAIErrorBody(Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Doc):
    error: OpenAIErrorBody


# -- Ollama -------------------------------------------------------------------------------------


class OllamaMessage(Doc):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Final(Doc, kw_only=True):
    """The last streamed line, or the whole answer with `stream: false`; durations in nanoseconds."""

    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load", "unload"]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: list[dict[str, Any]] | None = None


class OllamaChatResponse(Final, kw_only=True):
    message: OllamaMessage


class OllamaGenerateResponse(Final, kw_only=True):
    response: str
    thinking: str | None = None


class Details(Doc):
    parent_model: str
    format: str
    family: str
    families: list[str] | None
    parameter_size: str
    quantization_level: str


class ModelTag(Doc, kw_only=True):
    name: str
    model: str
    modified_at: str | None = None
    size: int
    digest: str
    details: Details
    expires_at: str | None = None  # /api/ps
    size_vram: int | None = None  # /api/ps
    context_length: int | None = None  # /api/ps


class ModelTags(Doc):
    models: list[ModelTag]


class ShowResponse(Doc):
    license: str
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(Doc):
    version: str


class PullStatus(Doc):
    """`/api/pull`: one line of the stream, or the whole answer with stream false."""

    status: str


class Embed(Doc):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class LegacyEmbedding(Doc):
    embedding: list[float]


class OllamaError(Doc):
    error: str


# -- tandem's own -------------------------------------------------------------------------------


class Memory(Doc):
    used_bytes: int
    total_bytes: int


class Health(Doc):
    """Readiness, with seed 003's and seed 001's fields; 200 when `status` is "healthy", 503 otherwise."""

    status: Literal["healthy", "starting", "draining"]
    gateway_pid: int  # which of several gateway processes answered
    model_loaded: bool
    model_name: str | None
    gpu_available: bool
    memory: Memory
    uptime_s: float
    workers: list[dict[str, Any]]
    loaded: list[dict[str, Any]]  # each loaded model: its workers' addresses, expires_at, size
    discovery: dict[str, list[str]]  # the worker addresses each discovery source (--worker-dns, --worker-ray) saw last


class Liveness(Doc):
    status: Literal["alive", "draining"]
