"""The control wire between gateways and the supervisor (launcher.py): which models exist, which are loaded where.

The supervisor alone decides what is loaded, however many gateways there are. A gateway asks (Load, Unload), says
that a request starts (Use: it carries the request's keep_alive) and, in every Beat, how many requests it has in
flight per model and which Registry version it has applied. The supervisor publishes the Registry (every available
model, and where each loaded one runs) to every gateway whenever it changes. A model is stopped only once every
live gateway has acknowledged the version that took it out of service and none has a request in flight on it, so
no request is ever sent to a worker that is being stopped.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec
from msgspec import Struct

from common.protocol import ModelCard

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(-?)((?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+)")
_PART = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from Ollama's keep_alive forms: a number of seconds ("300") or a Go duration ("5m", "1h30m",
    "-1m"). Negative means forever; the caller keeps the sign. Raises ValueError."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: try 300, 5m, 1h30m or -1")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(match[2]))
    return -seconds if match[1] else seconds


PlacementState = Literal["loading", "ready", "unloading"]


class Placement(Struct, omit_defaults=True):
    """A model with worker processes: where they listen, and until when it stays loaded."""

    name: str
    addresses: list[str]
    state: PlacementState
    expires_at: float | None = None  # unix seconds; None: never (keep_alive < 0), or busy with no timer yet
    size: int = 0  # bytes of memory the workers hold (resident set, or the estimate while loading)
    size_vram: int = 0  # of which on a GPU
    context_length: int = 0
    loaded_at: float = 0.0


class Registry(Struct, tag=True, omit_defaults=True):
    """Supervisor → gateway: the current state. `models` is sent only to a gateway whose catalog is older."""

    version: int
    catalog_version: int
    placements: list[Placement]
    models: list[ModelCard] | None = None  # every available model, loaded or not, in listing order


class Beat(Struct, tag=True, omit_defaults=True):
    """Gateway → supervisor, every 0.5 s and whenever a model's in-flight count goes from or to zero."""

    seen: int  # the Registry version this gateway has applied
    catalog: int  # the catalog version it holds
    busy: dict[str, int] = {}  # model name → requests in flight (also those waiting for a load)


class Use(Struct, tag=True, omit_defaults=True):
    """Gateway → supervisor: a request for a loaded model starts. keep_alive in seconds (negative: forever,
    None: the server's default), as Ollama's: each request sets how long the model stays after it."""

    model: str
    keep_alive: float | None = None


class Load(Struct, tag=True, omit_defaults=True):
    """Gateway → supervisor: load the model (or keep it from unloading); answered with Answer once it is ready."""

    id: int
    model: str
    keep_alive: float | None = None


class Unload(Struct, tag=True):
    """Gateway → supervisor: unload now (once its requests are done); answered once the workers have exited."""

    id: int
    model: str


class AddAdapter(Struct, tag=True, omit_defaults=True):
    """Gateway → supervisor: serve a LoRA adapter (a PEFT folder) as the model `name` (vLLM's load_lora_adapter);
    answered once its base model's workers have read it (if the base is loaded), or with why not."""

    id: int
    name: str
    path: str
    base: str | None = None  # the base model; None: the one the adapter names, else the first chat model


class RemoveAdapter(Struct, tag=True):
    """Gateway → supervisor: stop serving a LoRA adapter (requests running with it finish)."""

    id: int
    name: str


AnswerCode = Literal["ok", "not_found", "busy", "failed", "invalid"]  # invalid: the request cannot be served as sent


class Answer(Struct, tag=True, omit_defaults=True):
    """Supervisor → gateway: the outcome of a Load or Unload."""

    id: int
    code: AnswerCode = "ok"
    message: str = ""
    version: int = 0  # the Registry version that shows the outcome; the gateway waits until it has applied it


ToSupervisor = Beat | Use | Load | Unload | AddAdapter | RemoveAdapter
FromSupervisor = Registry | Answer

_encoder = msgspec.msgpack.Encoder()
to_supervisor_decoder = msgspec.msgpack.Decoder(ToSupervisor)
from_supervisor_decoder = msgspec.msgpack.Decoder(FromSupervisor)


def encode(message: ToSupervisor | FromSupervisor) -> bytes:
    return _encoder.encode(message)
