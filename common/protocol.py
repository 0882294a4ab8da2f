"""The wire messages between gateway and worker: msgspec Structs in one tagged union, msgpack frames.

Gateway → worker: Generate, Embed, Abort, Info.  Worker → gateway: Delta, Done, Embeddings, Failed, WorkerInfo.
The worker always streams a generation; a non-streaming HTTP answer is the gateway folding the deltas. An Embed is
answered by one Embeddings (or Failed). The supervisor also sends LoadAdapter and UnloadAdapter (LoRA adapters at run
time), answered by Ack or Failed.
A request id is unique per gateway connection; the worker keys its state by (peer, id).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# Ranges the worker relies on; the dialects check the same ranges before sending.
Temperature = Annotated[float, Meta(ge=0.0, le=100.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveFloat = Annotated[float, Meta(gt=0.0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]


class SamplingParams(Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    temperature: Temperature = 1.0
    top_p: Probability = 1.0
    top_k: NonNegativeInt = 0  # 0 = off
    min_p: Probability = 0.0
    seed: int | None = None
    repetition_penalty: PositiveFloat = 1.0  # multiplicative (HF / Ollama repeat_penalty)
    presence_penalty: Penalty = 0.0  # additive (OpenAI)
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[int, float] = {}
    max_tokens: PositiveInt | None = None  # None: up to the context length
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None  # top-N alternatives per token
    json_schema: str | None = None  # constrain the output to JSON this JSON Schema (as text) accepts; "{}": any
    # Hugging Face's max_length: prompt and output together (the seed services pass it to transformers). The worker
    # caps max_tokens with it once the prompt is tokenized; a prompt that already fills it fails as context_length.
    max_total_tokens: PositiveInt | None = None
    # The most reasoning tokens before the worker closes the think block and the answer begins (/thinking's
    # thinking_depth). Not enforced by the worker yet: the field travels, the engine ignores it.
    thinking_budget: NonNegativeInt | None = None


class ToolCallFunction(Struct, omit_defaults=True):
    name: str
    arguments: Any = None  # a JSON object, or a JSON string as OpenAI sends it


class ToolCall(Struct, omit_defaults=True):
    function: ToolCallFunction
    id: str | None = None
    type: str = "function"


class ChatMessage(Struct, omit_defaults=True):
    """One turn of a conversation, already flattened to text by the dialect."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # earlier turns' thinking, for templates that render it


class ForcedToolCall(Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The answer must be one tool call: to the function `name`, or to any of the request's tools when None."""

    name: str | None = None


class Generate(Struct, tag=True, omit_defaults=True):
    """Start one completion. Exactly one of `messages` (chat template applied) or `prompt` (raw)."""

    id: int
    model: str
    params: SamplingParams = SamplingParams()
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None  # JSON schemas, passed to the chat template
    force_tool_call: ForcedToolCall | None = None  # OpenAI tool_choice "required" or a named function
    think: bool | None = None  # None: the template's default
    template_kwargs: dict[str, Any] = {}  # extra chat-template variables (chat_template_kwargs)
    add_generation_prompt: bool = True
    # A LoRA adapter of `model` to run the request with (the request named the adapter; the pool sends it to its
    # base model's worker). None: the base model.
    adapter: str | None = None


EmbedInput = str | list[int]  # a text, or token ids of the model's own vocabulary (special tokens included)


class Embed(Struct, tag=True, omit_defaults=True):
    """Embed every input; answered by one Embeddings with the vectors in the inputs' order."""

    id: int
    model: str
    inputs: list[EmbedInput]
    truncate: bool = True  # False: an input longer than the model's context fails the request
    dimensions: PositiveInt | None = None  # keep the first N dimensions, then L2-normalise again


class Abort(Struct, tag=True):
    """Stop a request and free its state; the worker answers with Done(finish_reason="abort")."""

    id: int


class Info(Struct, tag=True):
    """Ask the worker to describe itself; also the gateway's heartbeat."""


class LoadAdapter(Struct, tag=True):
    """Register a LoRA adapter (a PEFT folder) under `name`; answered with Ack once it is read, or Failed."""

    id: int
    name: str
    path: str


class UnloadAdapter(Struct, tag=True):
    """Forget a LoRA adapter: new requests cannot name it; those running finish with it. Answered with Ack or Failed."""

    id: int
    name: str


class Ack(Struct, tag=True):
    """A LoadAdapter or UnloadAdapter is done."""

    id: int


class TokenLogprob(Struct, array_like=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(Struct, array_like=True):
    """The chosen token's log-probability and the top alternatives at that position."""

    token: str
    logprob: float
    bytes: list[int] | None
    top: list[TokenLogprob]


class Delta(Struct, tag=True, omit_defaults=True):
    """New output since the last event for this request. Text never splits a UTF-8 character."""

    id: int
    text: str = ""
    reasoning: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Logprob] | None = None
    tool_calls: list[ToolCall] | None = None  # complete calls parsed from the output (arguments: a JSON object)


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Timings(Struct, frozen=True):
    """Seconds, measured in the worker."""

    queue: float = 0.0  # arrival → first scheduled
    prefill: float = 0.0  # first scheduled → first token
    decode: float = 0.0  # first token → done
    load: float = 0.0  # model load time, on the first request a worker finishes; Ollama's load_duration


class Done(Struct, tag=True, omit_defaults=True):
    """The request finished; no more events follow for this id."""

    id: int
    finish_reason: FinishReason
    usage: Usage
    timings: Timings = Timings()
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any


class Embeddings(Struct, tag=True, omit_defaults=True):
    """An Embed's answer; no more events follow for this id."""

    id: int
    vectors: list[bytes]  # one per input: float32 little-endian, L2-normalised
    num_prompt_tokens: int
    timings: Timings = Timings()


ErrorCode = Literal["bad_request", "context_length", "not_found", "busy", "unavailable", "internal"]


class Failed(Struct, tag=True):
    """The request cannot be served; no more events follow for this id."""

    id: int
    code: ErrorCode
    message: str


class GenerationDefaults(Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A model's own defaults for what a request leaves unset (its generation_config.json, or the worker's
    --param, as Ollama's Modelfile PARAMETER). Precedence: the request, then these, then the server's."""

    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: NonNegativeInt | None = None
    min_p: Probability | None = None
    repetition_penalty: PositiveFloat | None = None
    max_tokens: PositiveInt | None = None
    stop: list[str] = []


class ModelCard(Struct, omit_defaults=True):
    """What the gateway needs to know about a served model."""

    name: str
    context_length: int
    architecture: str = ""
    num_parameters: int = 0
    size_bytes: int = 0
    quantization: str = ""
    dtype: str = ""
    chat_template: str = ""
    capabilities: list[str] = []  # "completion", "tools", "thinking"; "embedding" for an encoder
    family: str = ""
    format: str = ""  # "gguf", "safetensors"
    vocab_size: int = 0  # token ids run from 0 to vocab_size - 1 (logit_bias and stop_token_ids are checked against it)
    source: str = ""  # what the worker loaded: a .gguf file, a folder or a hub id
    defaults: GenerationDefaults = GenerationDefaults()
    embedding_length: int = 0  # an encoder's vector size (Ollama's model_info `<arch>.embedding_length`)
    parent: str = ""  # a LoRA adapter's base model (requests naming the adapter run on the base's worker)


class WorkerInfo(Struct, tag=True, omit_defaults=True):
    """The worker's self-description, sent in reply to Info."""

    instance: str  # changes on every start, so a gateway notices a restarted worker
    pid: int
    models: list[ModelCard]
    device: str
    started_at: float  # unix seconds
    max_running: int
    max_waiting: int
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_accelerators: int = 0  # CUDA devices the worker process sees
    memory_used_bytes: int = 0  # on the worker's device: CUDA memory torch holds, or the process's resident memory
    memory_total_bytes: int = 0  # the device's memory, or the host's RAM on CPU


ToWorker = Generate | Embed | Abort | Info | LoadAdapter | UnloadAdapter
ToGateway = Delta | Done | Embeddings | Failed | WorkerInfo | Ack

_encoder = msgspec.msgpack.Encoder()
to_worker_decoder = msgspec.msgpack.Decoder(ToWorker)
to_gateway_decoder = msgspec.msgpack.Decoder(ToGateway)


def encode(message: ToWorker | ToGateway) -> bytes:
    return _encoder.encode(message)
