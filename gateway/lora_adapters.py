"""vLLM's run-time LoRA routes: POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter.

As vLLM answers them: 200 with a plain-text "Success: …" line; errors in the OpenAI shape — 400 when both fields are
not given, when the name is taken (vLLM: "has already been loaded") or the folder cannot be served (tandem says why:
no adapter_config.json, DoRA, trained for another model…; vLLM answers 404 or 500 there), 404 for unloading an
adapter that is not loaded. The supervisor decides (supervisor/adapters.py), so every gateway agrees at once.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import BadRequest
from gateway.streaming import decode_body

Name = Annotated[str, Meta(max_length=256)]


class LoadLoraAdapterRequest(Struct, kw_only=True):
    lora_name: Name = ""
    lora_path: Annotated[str, Meta(max_length=4096)] = ""
    base_model_name: Name | None = None  # tandem's: the model to put it on (default: the one the adapter names)
    load_inplace: bool = False  # vLLM's: reload a loaded name; not served here


class UnloadLoraAdapterRequest(Struct, kw_only=True):
    lora_name: Name = ""
    lora_int_id: int | None = None  # vLLM's older field; ignored


load_decoder = msgspec.json.Decoder(LoadLoraAdapterRequest)
unload_decoder = msgspec.json.Decoder(UnloadLoraAdapterRequest)


async def load_lora_adapter(request: Request) -> Response:
    body = await decode_body(request, load_decoder)
    if not body.lora_name.strip() or not body.lora_path:
        raise BadRequest("Both 'lora_name' and 'lora_path' must be provided.")
    if body.load_inplace:
        raise BadRequest("load_inplace is not supported: unload the adapter, then load it again", param="load_inplace")
    await request.app.state.pool.add_adapter(body.lora_name.strip(), body.lora_path, body.base_model_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name.strip()}' added successfully.")


async def unload_lora_adapter(request: Request) -> Response:
    body = await decode_body(request, unload_decoder)
    if not body.lora_name.strip():
        raise BadRequest("'lora_name' needs to be provided to unload a LoRA adapter.")
    await request.app.state.pool.remove_adapter(body.lora_name.strip())
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name.strip()}' removed successfully.")


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
    ]
