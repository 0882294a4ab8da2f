"""GPTQ, AWQ and compressed-tensors checkpoints on CPU: 4-bit weights onto the int4 kernel, the rest dequantized.

transformers loads these formats only through their own packages and GPU kernels (gptqmodel, autoawq,
compressed-tensors); this reads the documented tensor layouts directly, so they run anywhere the runner runs:

- GPTQ (`quant_method: gptq`, AutoGPTQ/gptqmodel): `qweight` int32 [in/8, out] (8 codes per int32 along the input),
  `qzeros` int32 [groups, out/8] (along the output; stored minus one unless `checkpoint_format: gptq_v2`),
  `scales` [groups, out], `g_idx` [in]. w = scale * (q - zero).
- AWQ (`quant_method: awq`, GEMM version): `qweight` int32 [in, out/8] and `qzeros` [groups, out/8], both packed
  along the output in the order 0 2 4 6 1 3 5 7; `scales` [groups, out]. w = scale * (q - zero).
- compressed-tensors (`format: pack-quantized`, symmetric int4): `weight_packed` int32 [out, in/8], codes stored
  plus 8; `weight_scale` [out, groups]. `int-quantized`: `weight` int8 [out, in], `weight_scale` [out, 1].

4-bit weights in groups of 32-256 along the input (no act-order) map exactly onto torch's int4 layout; per-channel
int8 onto the int8 kernel. Anything else (act-order, 2/3/8-bit GPTQ, other group sizes) is dequantized, with a log
line saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from worker.catalog import PREQUANTIZED
from worker.quant import INT4_GROUPS, QuantWeight

logger = logging.getLogger(__name__)

METHODS = PREQUANTIZED  # the catalog labels them without torch
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ int32 holds output column AWQ_ORDER[i] of its 8


def quant_method(folder: Path) -> str:
    """The checkpoint's `quantization_config.quant_method` if it is one this module reads, else ""."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return method if method in METHODS else ""


def unpack_int4(packed: Tensor, dim: int) -> Tensor:
    """int32 words -> uint8 codes, 8 per word, nibble j (bits 4j..4j+3) first, along `dim` (0 or 1)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    if dim == 0:
        codes = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & 0x0F
        return codes.reshape(-1, packed.shape[1]).to(torch.uint8)
    codes = (packed.to(torch.int32)[:, :, None] >> shifts[None, None, :]) & 0x0F
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def _int4_weight(codes: Tensor, scale: Tensor, zero_codes: Tensor | None, source: str) -> QuantWeight | None:
    """codes [out, in], scale [out, groups], integer zero points [out, groups] (None: symmetric, 8)."""
    group = codes.shape[1] // scale.shape[1]
    if group not in INT4_GROUPS or group * scale.shape[1] != codes.shape[1]:
        return None
    scale = scale.float()
    zero = torch.zeros_like(scale) if zero_codes is None else (8 - zero_codes.float()) * scale
    return QuantWeight(codes, scale, zero, group, source)


def _dense(codes: Tensor, scale: Tensor, zero_codes: Tensor, groups_of_input: Tensor) -> Tensor:
    """w[out, in] = scale[out, g(in)] * (codes - zero[out, g(in)]) for any grouping (act-order included)."""
    return scale.float()[:, groups_of_input] * (codes.float() - zero_codes.float()[:, groups_of_input])


def gptq(tensors: dict[str, Tensor], config: dict[str, Any]) -> tuple[QuantWeight | None, Tensor]:
    bits = int(config.get("bits", 4))
    if bits != 4:
        raise ValueError(f"{bits}-bit GPTQ is not supported (4-bit is)")
    codes = unpack_int4(tensors["qweight"], dim=0).t().contiguous()  # [out, in]
    zeros = unpack_int4(tensors["qzeros"], dim=1).t().to(torch.int32)  # [out, groups]
    if config.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros = zeros + 1  # AutoGPTQ's v1 checkpoints store zero - 1
    scale = tensors["scales"].t()
    in_features = codes.shape[1]
    group = in_features // scale.shape[1]
    g_idx = tensors.get("g_idx")
    contiguous = torch.arange(in_features) // group
    if g_idx is None:
        g_idx = contiguous
    dense = _dense(codes, scale, zeros, g_idx.long())
    if torch.equal(g_idx.long(), contiguous):
        return _int4_weight(codes, scale, zeros, "GPTQ"), dense
    return None, dense  # act-order: groups interleave along the input


def awq(tensors: dict[str, Tensor], config: dict[str, Any]) -> tuple[QuantWeight | None, Tensor]:
    if int(config.get("bits", config.get("w_bit", 4))) != 4:
        raise ValueError("only 4-bit AWQ is supported")
    order = torch.tensor(AWQ_ORDER)
    reverse = torch.argsort(order)  # column j of each 8 is nibble reverse[j]

    def unpack(packed: Tensor) -> Tensor:
        codes = unpack_int4(packed, dim=1).view(packed.shape[0], -1, 8)
        return codes[:, :, reverse].reshape(packed.shape[0], -1)

    codes = unpack(tensors["qweight"]).t().contiguous()  # [out, in]
    zeros = unpack(tensors["qzeros"]).t().to(torch.int32)  # [out, groups]
    scale = tensors["scales"].t()
    group = codes.shape[1] // scale.shape[1]
    dense = _dense(codes, scale, zeros, torch.arange(codes.shape[1]) // group)
    return _int4_weight(codes, scale, zeros, "AWQ"), dense


def compressed(tensors: dict[str, Tensor], config: dict[str, Any]) -> tuple[QuantWeight | None, Tensor]:
    scale = tensors["weight_scale"]
    if "weight_packed" in tensors:
        if "weight_zero_point" in tensors:
            raise ValueError("asymmetric pack-quantized compressed-tensors weights are not supported")
        codes = unpack_int4(tensors["weight_packed"], dim=1)
        out_features, in_features = (int(n) for n in tensors["weight_shape"].tolist())
        codes = codes[:out_features, :in_features].contiguous()
        groups = torch.arange(in_features) // (in_features // scale.shape[1])
        dense = scale.float()[:, groups] * (codes.float() - 8)
        return _int4_weight(codes, scale, None, "compressed-tensors"), dense
    codes = tensors["weight"]
    if codes.dtype != torch.int8:
        raise ValueError(f"compressed-tensors weights of type {codes.dtype} are not supported")
    groups = torch.arange(codes.shape[1]) // (codes.shape[1] // scale.shape[1])
    dense = scale.float()[:, groups] * codes.float()
    if scale.shape[1] == 1:  # per channel: the int8 kernel's layout
        return QuantWeight(codes.contiguous(), scale.float()[:, 0], None, 0, "compressed-tensors"), dense
    return None, dense


SUFFIXES = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight"),
}
READERS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed}
MARKERS = {"gptq": "qweight", "awq": "qweight", "compressed-tensors": "weight_scale"}


def load_prequantized(folder: Path, dtype: torch.dtype) -> tuple[Any, dict[str, QuantWeight], str]:
    """The HF model with dequantized weights in place, the int4/int8 weights for the runner, and a label."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    quant_config = raw.get("quantization_config") or {}
    method = str(quant_config.get("quant_method", "")).lower()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors: dict[str, Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    state: dict[str, Tensor] = {}
    weights: dict[str, QuantWeight] = {}
    dequantized = []
    prefixes = sorted(k.removesuffix("." + MARKERS[method]) for k in tensors if k.endswith("." + MARKERS[method]))
    for prefix in prefixes:
        parts = {s: tensors.pop(f"{prefix}.{s}") for s in SUFFIXES[method] if f"{prefix}.{s}" in tensors}
        quantized, dense = READERS[method](parts, quant_config)
        state[f"{prefix}.weight"] = dense.to(dtype)
        if quantized is None:
            dequantized.append(prefix)
        else:
            weights[prefix] = quantized
    state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing = {name for name, _ in model.named_parameters()} - set(state)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in missing:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if dequantized:
        logger.warning(
            "%d of %d %s weights have no int4/int8 kernel layout (act-order or group size); dequantized, e.g. %s",
            len(dequantized),
            len(prefixes),
            method,
            dequantized[0],
        )
    return model, weights, f"{method.upper()}-INT{8 if any(w.bits == 8 for w in weights.values()) else 4}"
