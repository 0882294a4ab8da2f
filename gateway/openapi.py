"""GET /openapi.json: an OpenAPI 3.1 document built from the msgspec request and answer types of every route, and
Swagger UI at /docs and ReDoc at /redoc (seeds 000, 001 and 003 point their users there), served offline.

The routes are one table below; the schemas come from `msgspec.json.schema_components`, so a field added to a
request type is in the document at once. The UI assets come from the PyPI package drf-spectacular-sidecar
(installed with --no-deps: its Django requirement is for Django's static-files finder, not for the files).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import (
    answers,
    embeddings,
    llamafactory,
    lora_adapters,
    ollama_models,
    ollama_requests,
    openai_requests,
    qwen3_service,
    qwen_chat,
    seeds,
)
from gateway import thinking_service as thinking
from gateway.streaming import JSONBody

REF = "#/components/schemas/{name}"
SSE, NDJSON, TEXT = "text/event-stream", "application/x-ndjson", "text/plain"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    tag: str  # "; " between several
    summary: str
    request: Any = None  # a msgspec type; None: no body
    answer: Any = None  # the JSON answer's type; None: `media` only
    media: str = "application/json"
    stream: str | None = None  # the answer's media type when the request asks for a stream
    errors: Any = None  # the error body's type


OPENAI, OLLAMA, TANDEM = "OpenAI", "Ollama", "tandem"
SEED_000, SEED_001 = "seed 000: Qwen3 service", "seed 001: Qwen3-4B-Thinking service"
SEED_002, SEED_003 = "seed 002: Qwen-7B-Chat", "seed 003: LLaMA-Factory service"
O_ERR, L_ERR, S_ERR = answers.OpenAIError, answers.OllamaError, seeds.Detail

OPERATIONS = [
    Operation("POST", "/v1/chat/completions", OPENAI, "Chat completion", openai_requests.ChatCompletionRequest,
              answers.ChatCompletion, stream=SSE, errors=O_ERR),
    Operation("POST", "/v1/completions", OPENAI, "Text completion (legacy)", openai_requests.CompletionRequest,
              answers.Completion, stream=SSE, errors=O_ERR),
    Operation("GET", "/v1/models", OPENAI, "List the served models", answer=answers.ModelList, errors=O_ERR),
    Operation("GET", "/v1/models/{model}", OPENAI, "One served model", answer=answers.Model, errors=O_ERR),
    Operation("POST", "/v1/load_lora_adapter", OPENAI, "Serve a LoRA adapter (a PEFT folder) as a model (vLLM's)",
              lora_adapters.LoadLoraAdapterRequest, media=TEXT, errors=O_ERR),
    Operation("POST", "/v1/unload_lora_adapter", OPENAI, "Stop serving a LoRA adapter (vLLM's)",
              lora_adapters.UnloadLoraAdapterRequest, media=TEXT, errors=O_ERR),
    Operation("POST", "/api/chat", OLLAMA, "Chat (streams NDJSON unless stream is false)",
              ollama_requests.ChatRequest, answers.OllamaChatResponse, stream=NDJSON, errors=L_ERR),
    Operation("POST", "/api/generate", OLLAMA, "Generate (streams NDJSON unless stream is false)",
              ollama_requests.GenerateRequest, answers.OllamaGenerateResponse, stream=NDJSON, errors=L_ERR),
    Operation("GET", "/api/tags", OLLAMA, "Local models", answer=answers.ModelTags, errors=L_ERR),
    Operation("GET", "/api/ps", OLLAMA, "Loaded models", answer=answers.ModelTags, errors=L_ERR),
    Operation("POST", "/api/show", OLLAMA, "Model details", ollama_requests.ShowRequest, answers.ShowResponse,
              errors=L_ERR),
    Operation("GET", "/api/version", OLLAMA, "Version", answer=answers.Version),
    Operation("POST", "/api/pull", OLLAMA, "A model that is here: Ollama's success stream", ollama_models.ModelRequest,
              answers.PullStatus, stream=NDJSON, errors=L_ERR),
    Operation("DELETE", "/api/delete", OLLAMA, "Refused: tandem serves the files it is given", errors=L_ERR),
    Operation("POST", "/api/delete", OLLAMA, "Refused, as DELETE", errors=L_ERR),
    Operation("POST", "/api/copy", OLLAMA, "Refused: tandem serves the files it is given", errors=L_ERR),
    Operation("POST", "/api/create", OLLAMA, "Refused: tandem serves the files it is given", errors=L_ERR),
    Operation("POST", "/api/push", OLLAMA, "Refused: tandem serves the files it is given", errors=L_ERR),
    Operation("POST", "/v1/embeddings", OPENAI, "Embeddings", embeddings.OpenAIRequest, answers.EmbeddingList,
              errors=O_ERR),
    Operation("POST", "/api/embed", OLLAMA, "Embeddings", embeddings.EmbedRequest, answers.Embed, errors=L_ERR),
    Operation("POST", "/api/embeddings", OLLAMA, "Embedding (legacy)", embeddings.LegacyRequest,
              answers.LegacyEmbedding, errors=L_ERR),
    Operation("GET", "/chat", TANDEM, "The chat page (HTML; its files under /chat/assets/)", media="text/html"),
    Operation("GET", "/server_info", TANDEM, "What a router reads to name this server's model (SGLang's shape)",
              answer=dict[str, Any]),
    Operation("GET", "/get_server_info", TANDEM, "As /server_info (SGLang's older name)", answer=dict[str, Any]),
    Operation("GET", "/model_info", TANDEM, "The served model, for routers (SGLang's shape)", answer=dict[str, Any]),
    Operation("GET", "/get_model_info", TANDEM, "As /model_info (SGLang's older name)", answer=dict[str, Any]),
    Operation("GET", "/", OLLAMA, "'Ollama is running'; seed 003's description to a client that accepts JSON; "
              "the chat page to a browser",
              answer=llamafactory.ServiceInfo, media=TEXT),
    Operation("GET", "/health", TANDEM, "Readiness: 200 ready, 503 not (with seeds 001 and 003's fields)",
              answer=answers.Health),
    Operation("GET", "/health/ready", TANDEM, "Readiness, as /health", answer=answers.Health),
    Operation("GET", "/health/live", TANDEM, "Liveness", answer=answers.Liveness),
    Operation("GET", "/stats", TANDEM, "Figures for people (with seed 001's fields)", answer=dict[str, Any]),
    Operation("GET", "/metrics", TANDEM, "Prometheus metrics", media=TEXT),
    Operation("POST", "/api/v1/chat", SEED_000, "Chat", qwen3_service.ChatRequest, qwen3_service.ChatResponse,
              errors=S_ERR),
    Operation("POST", "/api/v1/chat/stream", SEED_000, "Chat, streamed: SSE of {type, content} (thinking tagged)",
              qwen3_service.ChatRequest, qwen3_service.StreamEvent, media=SSE, errors=S_ERR),
    Operation("GET", "/api/v1/health", SEED_000, "Model health", answer=qwen3_service.HealthResponse, errors=S_ERR),
    Operation("GET", "/api/v1/model/info", SEED_000, "Model info", answer=qwen3_service.ModelInfo, errors=S_ERR),
    Operation("POST", "/api/v1/model/load", SEED_000, "Load the model (the body is optional)",
              qwen3_service.LoadRequest, qwen3_service.LoadResponse, errors=S_ERR),
    Operation("POST", "/generate", SEED_001 + "; " + SEED_003, "Generate from a prompt (001's and 003's fields)",
              llamafactory.GenerateRequest, llamafactory.GenerateResponse, stream=SSE, errors=S_ERR),
    Operation("POST", "/thinking", SEED_001, "Answer with thinking on: reasoning and a confidence",
              thinking.ThinkingRequest, thinking.ThinkingResponse, errors=S_ERR),
    Operation("POST", "/batch_generate", SEED_001, "Up to 10 prompts, in one batch",
              thinking.BatchGenerateRequest, thinking.BatchGenerateResponse, errors=S_ERR),
    Operation("POST", "/", SEED_002, "Chat with [user, assistant] pair history", qwen_chat.ChatRequest,
              qwen_chat.ChatResponse, errors=S_ERR),
    Operation("POST", "/chat", SEED_003, "Chat", llamafactory.ChatRequest, llamafactory.ChatResponse, stream=SSE,
              errors=S_ERR),
    Operation("POST", "/batch", SEED_003, "Many prompts, in one batch", llamafactory.BatchRequest,
              llamafactory.BatchResponse, errors=S_ERR),
    Operation("GET", "/model/info", SEED_003, "Model info", answer=llamafactory.ModelInfo, errors=S_ERR),
]  # fmt: skip


def _content(media: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    return {media: {"schema": schema if schema is not None else {"type": "string"}}}


def _operation(op: Operation, schema_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    answer = schema_of.get(op.answer)
    content = _content(op.media, answer if op.media != TEXT else None)
    if op.media == TEXT and answer is not None:  # GET /: text, or JSON to a client asking for it
        content.update(_content("application/json", answer))
    if op.stream:
        content.update(_content(op.stream, None))
    result: dict[str, Any] = {
        "tags": op.tag.split("; "),
        "summary": op.summary,
        "operationId": f"{op.method.lower()} {op.path}",
        "responses": {"200": {"description": "OK", "content": content}},
    }
    if op.request is not None:
        body = _content("application/json", schema_of[op.request])
        result["requestBody"] = {"required": op.request is not qwen3_service.LoadRequest, "content": body}
    if op.errors is not None:
        errors = _content("application/json", schema_of[op.errors])
        result["responses"]["default"] = {"description": "Error", "content": errors}
    if "{model}" in op.path:
        result["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    return result


@functools.cache
def document(version: str) -> dict[str, Any]:
    types = list(dict.fromkeys(t for op in OPERATIONS for t in (op.request, op.answer, op.errors) if t is not None))
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    schema_of = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, schema_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tandem",
            "version": version,
            "description": "OpenAI and Ollama compatible LLM server, and the seed services' own APIs.",
        },
        "tags": [{"name": tag} for tag in (OPENAI, OLLAMA, TANDEM, SEED_000, SEED_001, SEED_002, SEED_003)],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],  # a key only where the server was started with --api-key
    }


# -- the pages ----------------------------------------------------------------------------------

ASSETS = "/docs/assets"
SWAGGER_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tandem API: Swagger UI</title>
<link rel="stylesheet" href="{ASSETS}/swagger-ui-dist/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{ASSETS}/swagger-ui-dist/swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", presets: [SwaggerUIBundle.presets.apis]}});
</script>
</body></html>
"""
REDOC_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tandem API: ReDoc</title></head>
<body><redoc spec-url="/openapi.json"></redoc><script src="{ASSETS}/redoc/bundles/redoc.standalone.js"></script>
</body></html>
"""


def assets_folder() -> Path | None:
    """The sidecar package's static folder, found without importing it (its __init__ imports Django)."""
    spec = importlib.util.find_spec("drf_spectacular_sidecar")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "static" / "drf_spectacular_sidecar"


async def openapi_json(request: Request) -> Response:
    return JSONBody(document(request.app.state.config.version))


async def swagger_ui(request: Request) -> Response:
    return HTMLResponse(SWAGGER_PAGE)


async def redoc(request: Request) -> Response:
    return HTMLResponse(REDOC_PAGE)


def routes() -> list[BaseRoute]:
    pages: list[BaseRoute] = [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", swagger_ui, methods=["GET"]),
        Route("/redoc", redoc, methods=["GET"]),
    ]
    folder = assets_folder()
    return pages + [Mount(ASSETS, app=StaticFiles(directory=folder))] if folder else pages
