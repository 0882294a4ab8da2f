"""Test and bench support: GPTQ, AWQ and compressed-tensors checkpoints, packed here from a dense model's weights.

No such checkpoint can be downloaded on these machines, so the unit tests, the end-to-end tests and bench/quality.py
pack one themselves, in each format's documented layout (worker/prequantized.py reads it back): the linear
projections of every layer quantized to 4 bits in groups along the input, as AutoGPTQ, AutoAWQ and
compressed-tensors store them; embeddings, norms and the lm_head stay dense, as those tools leave them. The
quantization is round-to-nearest per group, not GPTQ's or AWQ's calibrated search: the layouts are the tools',
the values are not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from worker.prequantized import AWQ_ORDER

METHODS = ("gptq", "awq", "compressed-tensors")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """uint4 codes -> int32 words of 8, nibble j = the j-th code along `dim` (the layout all three formats use)."""
    values = codes.numpy().astype(np.uint32)
    if dim == 0:
        values = values.reshape(-1, 8, values.shape[1]).transpose(0, 2, 1)  # [words, cols, 8]
    else:
        values = values.reshape(values.shape[0], -1, 8)
    words = sum(values[..., j] << np.uint32(4 * j) for j in range(8))
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int32))


def quantize_groups(
    weight: torch.Tensor, symmetric: bool, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [out, in] 0..15, fp16 scale [out, groups], integer zero [out, groups]: w = scale * (codes - zero)."""
    groups = weight.float().view(weight.shape[0], -1, group)
    tiny = torch.finfo(torch.float16).tiny  # an all-zero group: a scale that fp16 keeps, not 0
    if symmetric:
        scale = (groups.abs().amax(-1) * 2 / 15).clamp(min=tiny).half().float()
        zero = torch.full_like(scale, 8)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=tiny).half().float()
        zero = torch.round(-low / scale).clamp(1, 15)  # >= 1: GPTQ v1 stores zero - 1
    codes = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, 15)
    return codes.view_as(weight).to(torch.uint8), scale, zero


def pack_module(
    name: str, weight: torch.Tensor, method: str, group: int, act_order: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One linear weight [out, in] as `method` stores it (tensors named `name.qweight` ...), and the dense weight
    the packed tensors stand for. `act_order`: GPTQ's groups interleaved along the input, as desc_act makes them."""
    codes, scale, zero = quantize_groups(weight, symmetric=method != "awq", group=group)
    g_idx = torch.arange(weight.shape[1]) // group
    if act_order:
        g_idx = torch.arange(weight.shape[1]) % (weight.shape[1] // group)
        codes = torch.round(weight.float() / scale[:, g_idx] + zero[:, g_idx]).clamp(0, 15).to(torch.uint8)
    dense = scale[:, g_idx] * (codes.float() - zero[:, g_idx])
    if method == "gptq":
        return {
            f"{name}.qweight": pack(codes.t().contiguous(), dim=0),
            f"{name}.qzeros": pack((zero - 1).to(torch.uint8).t().contiguous(), dim=1),
            f"{name}.scales": scale.t().half().contiguous(),
            f"{name}.g_idx": g_idx.to(torch.int32),
        }, dense
    if method == "awq":
        order = torch.tensor(AWQ_ORDER)

        def awq_pack(values: torch.Tensor) -> torch.Tensor:
            return pack(values.view(values.shape[0], -1, 8)[:, :, order].reshape(values.shape[0], -1), dim=1)

        return {
            f"{name}.qweight": awq_pack(codes.t().contiguous()),
            f"{name}.qzeros": awq_pack(zero.to(torch.uint8).t().contiguous()),
            f"{name}.scales": scale.t().half().contiguous(),
        }, dense
    if method == "compressed-tensors":  # pack-quantized, symmetric: codes stored plus 8
        return {
            f"{name}.weight_packed": pack(codes, dim=1),
            f"{name}.weight_scale": scale.half(),
            f"{name}.weight_shape": torch.tensor(list(weight.shape)),
        }, dense
    raise ValueError(f"unknown method {method!r} (try {', '.join(METHODS)})")


def quantization_config(method: str, group: int, act_order: bool = False) -> dict[str, Any]:
    """The `quantization_config` each tool writes into config.json (the keys worker/prequantized.py reads)."""
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    return {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": True},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "compressed-tensors": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        },
    }[method]


def write_checkpoint(
    folder: Path, model: torch.nn.Module, method: str, group: int, act_order: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """`model` packed in `method`'s layout into folder/model.safetensors and config.json; returns the dense weight
    each quantized module stands for. Modules whose name ends in one of `act_order` get GPTQ's act-order groups."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the embeddings: the loader ties it again
    expected: dict[str, torch.Tensor] = {}
    for name, _module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        weight = state.pop(f"{name}.weight")
        packed, expected[name] = pack_module(name, weight, method, group, act_order=name.endswith(act_order))
        state.update(packed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(method, group, act_order=bool(act_order))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return expected


def write_method(model: torch.nn.Module, tokenizer: Any, folder: Path, name: str, method: str, group: int) -> Path:
    """`folder/name`: a servable checkpoint (weights, config, tokenizer, generation config) of `model` in `method`'s
    layout, written once (a later call finds it)."""
    dest = folder / name
    if not (dest / "config.json").is_file():
        temporary = folder / f".{name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)  # what an interrupted write left
        write_checkpoint(temporary, model, method, group)
        tokenizer.save_pretrained(temporary)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temporary)
        temporary.rename(dest)
    return dest


# -- the default model, packed: what tests/e2e and bench/quality.py serve and measure --------------------------------

SYNTHETIC = {"GPTQ": "gptq", "AWQ": "awq", "compressed-tensors": "compressed-tensors"}  # format name: quant_method
# The tools' usual group of 128 does not divide SmolLM2-135M's 576-wide rows; 64 does (and is not Q4_1's 32).
SYNTHETIC_GROUP = 64


def write_default_model(folder: Path, format_names: list[str], cache_dir: Path) -> list[Path]:
    """`folder/SmolLM2-135M-Instruct-<format>` per name (keys of SYNTHETIC): the default model's weights (the shipped
    Q4_1 file dequantized to fp32, converted through `cache_dir`) packed in that layout, each written once."""
    from worker.models import default_model_path, load_model

    stem = default_model_path().stem.rsplit(".", 1)[0]
    paths = [folder / f"{stem}-{name}" for name in format_names]
    loaded = None
    for name, path in zip(format_names, paths, strict=True):
        if not (path / "config.json").is_file():
            if loaded is None:  # ~10 s: only when one is missing
                loaded = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir, quantize="none")
            folder.mkdir(parents=True, exist_ok=True)
            write_method(loaded.model, loaded.tokenizer, folder, path.name, SYNTHETIC[name], SYNTHETIC_GROUP)
    return paths
