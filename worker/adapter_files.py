"""PEFT LoRA adapter folders (`adapter_config.json` + `adapter_model.safetensors`), read without torch.

What PEFT and LLaMA-Factory write: one low-rank pair per targeted linear, `...layers.N.self_attn.q_proj.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r], applied as `W x + scale * B (A x)` with scale = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora). The supervisor lists adapters from this (milliseconds, no weights read); the
worker reads the tensors the same header names (worker/lora.py). Anything this server would compute wrongly — DoRA,
LoRA biases, fan_in_fan_out, extra trained modules, an embedding or lm_head LoRA — is refused here, with the reason.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT saves `base_model.model.<module path>`; other tools save the module path alone. The adapter's own name
# ("default") is stripped on save, but some writers keep it between lora_A and .weight.
_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\."
    rf"({'|'.join(MODULES)})\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_FLOAT_DTYPES = ("F32", "F16", "BF16")


class AdapterError(Exception):
    """An adapter folder this server cannot serve; the message says why, for the client or the log as is."""


@dataclass(frozen=True)
class ModuleLora:
    """One targeted linear: where its tensors are and how the delta is scaled."""

    layer: int
    module: str  # one of MODULES
    rank: int
    in_features: int
    out_features: int
    scale: float
    a_key: str  # tensor names in the safetensors file
    b_key: str


@dataclass(frozen=True)
class AdapterFiles:
    path: Path  # the folder
    base_model: str  # adapter_config.json's base_model_name_or_path ("" if unset)
    modules: tuple[ModuleLora, ...]
    num_parameters: int
    size_bytes: int

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules)


def read_adapter(path: str | Path) -> AdapterFiles:
    """Check the folder's config and the safetensors header; raises AdapterError saying what is wrong."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter folder not found: {path}")
    config = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is a pickle, not read here: save with safe_serialization)" if pickled else ""
        raise AdapterError(f"no {WEIGHTS_FILE} in {folder}{hint}")
    header = _safetensors_header(weights)
    pairs: dict[tuple[int, str], dict[str, tuple[str, list[int]]]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        match = _TENSOR.match(key)
        if match is None:
            raise AdapterError(
                f"{weights.name}: tensor {key!r} is not a LoRA pair of a decoder linear "
                f"({', '.join(MODULES)}); embedding, lm_head and modules_to_save weights are not served"
            )
        if entry.get("dtype") not in _FLOAT_DTYPES or len(entry.get("shape", [])) != 2:
            kind = f"{entry.get('dtype')} {entry.get('shape')}"
            raise AdapterError(f"{weights.name}: tensor {key!r} is {kind}, not a float matrix")
        pairs.setdefault((int(match[1]), match[2]), {})[match[3]] = (key, list(entry["shape"]))
    if not pairs:
        raise AdapterError(f"{weights.name} holds no LoRA weights")
    modules = tuple(_module(config, layer, name, pair) for (layer, name), pair in sorted(pairs.items()))
    return AdapterFiles(
        path=folder,
        base_model=str(config.get("base_model_name_or_path") or ""),
        modules=modules,
        num_parameters=sum(m.rank * (m.in_features + m.out_features) for m in modules),
        size_bytes=weights.stat().st_size,
    )


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except OSError:
        raise AdapterError(f"no {CONFIG_FILE} in {folder}: not a PEFT adapter folder") from None
    except ValueError as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} is not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter type {config.get('peft_type')!r} is not served (only LORA)")
    refused = {
        "use_dora": "DoRA adapters",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
        "lora_bias": "LoRA biases",
        "use_qalora": "QA-LoRA adapters",
    }
    for field, what in refused.items():
        if config.get(field):
            raise AdapterError(f"{what} are not served ({field}: true)")
    for field, what in {
        "alora_invocation_tokens": "activated LoRA (aLoRA)",
        "layer_replication": "replicated layers",
        "arrow_config": "Arrow routing",
    }.items():
        if config.get(field):
            raise AdapterError(f"{what} is not served ({field} is set)")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"trained biases are not served (bias: {config.get('bias')!r}; only 'none')")
    if config.get("modules_to_save"):
        raise AdapterError(f"modules_to_save {config['modules_to_save']} are not served: only LoRA pairs are")
    for field in ("r", "lora_alpha"):
        value = config.get(field, 8)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{CONFIG_FILE}: {field} must be a positive number, not {value!r}")
    return config


def _module(config: dict[str, Any], layer: int, name: str, pair: dict[str, tuple[str, list[int]]]) -> ModuleLora:
    where = f"layer {layer} {name}"
    if set(pair) != {"A", "B"}:
        raise AdapterError(f"{where}: lora_{'B' if 'A' in pair else 'A'} is missing")
    (a_key, (rank, in_features)), (b_key, (out_features, b_rank)) = pair["A"], pair["B"]
    if rank != b_rank or rank == 0:
        raise AdapterError(f"{where}: lora_A has rank {rank} but lora_B {b_rank}")
    path = f"model.layers.{layer}.{'self_attn' if name in MODULES[:4] else 'mlp'}.{name}"
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return ModuleLora(layer, name, rank, in_features, out_features, scale, a_key, b_key)


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path it ends (after a dot) as a regex."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header (its length is the file's first 8 bytes, little-endian)."""
    try:
        with path.open("rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(file.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"unreadable safetensors file {path}: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"unreadable safetensors file {path}: the header is not an object")
    return header
