"""A model's generation defaults: what its generation_config.json asks for, or a GGUF file's recommended sampling
(llama.cpp's `general.sampling.*` keys), overridden by the worker's --param flags (Ollama's Modelfile PARAMETER
names). The gateway uses them where a request leaves a setting unset."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from common.protocol import GenerationDefaults
from worker.gguf_header import GGUFError, read_gguf

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


# llama.cpp's recommended-sampler keys (gguf-py's Keys.General.SAMPLING_*) that have a GenerationDefaults field; the
# others (sequence, xtc_*, penalty_last_n, mirostat*) name samplers tandem does not run.
GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def from_gguf(path: Path) -> dict[str, Any]:
    """The sampling a GGUF file recommends, from its header (milliseconds); float32 values rounded back to what was
    written (0.6, not 0.6000000238)."""
    try:
        fields, _ = read_gguf(path)
    except GGUFError as exc:
        logger.warning("no generation defaults from %s: %s", path, exc)
        return {}
    found = {field: fields[key] for key, field in GGUF_SAMPLING.items() if fields.get(key) is not None}
    return {field: round(value, 6) if isinstance(value, float) else value for field, value in found.items()}


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


def generation_defaults(model: Any, params: list[str], gguf: Path | None = None) -> GenerationDefaults:
    """generation_config.json, then the GGUF file's sampling keys (`gguf`: the file the model was loaded from), then
    --param: each over the one before."""
    from_file = from_gguf(gguf) if gguf is not None else {}
    merged = {**from_generation_config(model), **from_file, **parse_params(params)}
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
