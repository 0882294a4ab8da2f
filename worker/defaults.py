"""A model's generation defaults: what its generation_config.json asks for, overridden by the worker's --param
flags (Ollama's Modelfile PARAMETER names). The gateway uses them where a request leaves a setting unset."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from common.protocol import GenerationDefaults

logger = logging.getLogger(__name__)

# Ollama's PARAMETER names (and transformers' generation_config keys) → GenerationDefaults fields.
NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "repetition_penalty": "repetition_penalty",
    "num_predict": "max_tokens",
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "stop": "stop",
}


def from_generation_config(model: Any) -> dict[str, Any]:
    """Only what the model's generation_config.json sets (transformers' own defaults, like top_k 50, are not the
    model's); a model that asks for greedy decoding (do_sample false) gets temperature 0."""
    config = getattr(model, "generation_config", None)
    given: dict[str, Any] = config.to_diff_dict() if config is not None else {}
    found = {NAMES[key]: value for key, value in given.items() if key in NAMES and value is not None}
    if given.get("do_sample") is False:
        found["temperature"] = 0.0
    return found


def parse_params(params: list[str]) -> dict[str, Any]:
    """`--param NAME=VALUE` flags; `stop` may repeat. Raises ValueError naming a bad one."""
    found: dict[str, Any] = {}
    for param in params:
        name, sep, value = param.partition("=")
        field = NAMES.get(name.strip().lower())
        if not sep or field is None:
            raise ValueError(f"--param {param!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(NAMES))}")
        if field == "stop":
            found.setdefault("stop", []).append(value)
        else:
            found[field] = msgspec.json.decode(value.strip())
    return found


def generation_defaults(model: Any, params: list[str]) -> GenerationDefaults:
    merged = {**from_generation_config(model), **parse_params(params)}
    defaults = to_defaults(merged)
    if merged:
        logger.info("generation defaults: %s", msgspec.json.encode(defaults).decode())
    return defaults


def to_defaults(found: dict[str, Any]) -> GenerationDefaults:
    """Raises ValueError for a value out of range."""
    if isinstance(found.get("stop"), str):
        found = {**found, "stop": [found["stop"]]}
    try:
        return msgspec.convert(found, GenerationDefaults)
    except msgspec.ValidationError as exc:
        raise ValueError(f"the model's generation defaults are out of range: {exc}") from None
