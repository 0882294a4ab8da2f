"""GGUF tensors as integer weights for the runner's kernels: 4-bit blocks exactly, other quantized types as int8."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.quant import QuantWeight, quantize_int8

logger = logging.getLogger(__name__)

# GGUF tensor names (llama.cpp's) of the linear layers, and the HF module each one is.
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NAME = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<kind>\w+)\.weight$")
# Types whose blocks are 32 codes of 4 bits with one scale and one offset: torch's int4 layout exactly.
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
BLOCK = 32


def read_gguf_weights(path: Path, config: Any) -> dict[str, QuantWeight]:
    """The quantized linear weights of a GGUF file, by HF module name (`model.layers.3.mlp.up_proj`, `lm_head`).

    Q4_0, Q4_1 and Q4_K become int4 codes with the file's own scales; every other quantized type (Q8_0, Q6_K,
    Q5_*, ...) is dequantized and requantized to int8 with one scale per row, which is lossy (measured in
    README). Float tensors (F32, F16, BF16) are left out: those layers run dense.
    """
    import gguf

    started = time.perf_counter()
    reader = gguf.GGUFReader(path)
    architecture = _string_field(reader, "general.architecture")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    weights: dict[str, QuantWeight] = {}
    for name, tensor in tensors.items():
        module = _module_name(name, "output.weight" in tensors)
        if module is None or tensor.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        weight = decode(tensor.tensor_type.name, np.asarray(tensor.data), int(tensor.shape[0]))
        kind = module.rsplit(".", 1)[-1]
        if architecture == "llama" and kind in ("q_proj", "k_proj"):  # undo llama.cpp's rope row order
            heads = config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads
            weight = weight.rows(_unpermute_index(weight.shape[0], heads))
        weights[module] = weight
    types = sorted({w.source for w in weights.values()})
    logger.info("read %d quantized GGUF weights (%s) in %.1f s", len(weights), ", ".join(types), _since(started))
    return weights


def _since(started: float) -> float:
    return time.perf_counter() - started


def _string_field(reader: Any, key: str) -> str:
    field = reader.fields.get(key)
    return "" if field is None else bytes(field.parts[field.data[0]]).decode()


def _module_name(name: str, has_output: bool) -> str | None:
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):  # tied: the embedding is both
        return "lm_head"
    match = LAYER_NAME.match(name)
    if match is None or match["kind"] not in LAYER_TENSORS:
        return None
    return f"model.layers.{match['layer']}.{LAYER_TENSORS[match['kind']]}"


def _unpermute_index(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `reverse_permute_weights`)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(-1)


def decode(type_name: str, data: np.ndarray, in_features: int) -> QuantWeight:
    """One tensor's raw blocks [out, bytes per row] as a QuantWeight."""
    out_features = data.shape[0]
    if type_name in INT4_TYPES:
        blocks = data.reshape(out_features, -1, _BLOCK_BYTES[type_name])
        codes, scale, zero = _INT4_DECODERS[type_name](blocks)
        return QuantWeight(
            torch.from_numpy(codes.reshape(out_features, in_features)),
            torch.from_numpy(scale.reshape(out_features, -1)),
            torch.from_numpy(zero.reshape(out_features, -1)),
            BLOCK,
            type_name,
        )
    import gguf.quants

    dense = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
    return quantize_int8(torch.from_numpy(np.ascontiguousarray(dense)).view(out_features, in_features), type_name)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs 32 codes in 16 bytes: low nibbles are codes 0-15, high nibbles codes 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """18 bytes: fp16 d, 16 bytes of codes. w = d * (q - 8)."""
    d = _f16(blocks[..., :2])[..., 0]
    return _nibbles(blocks[..., 2:]), d, np.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20 bytes: fp16 d, fp16 m, 16 bytes of codes. w = d * q + m = (q - 8) * d + (m + 8 d)."""
    d, m = _f16(blocks[..., :2])[..., 0], _f16(blocks[..., 2:4])[..., 0]
    return _nibbles(blocks[..., 4:]), d, m + 8 * d


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """144 bytes per 256 weights: fp16 d and dmin, 8 six-bit scales and mins, 128 bytes of codes.

    Sub-block j of 32: w = d * sc_j * q - dmin * m_j. Its codes: 32-byte chunk j // 2, low nibbles for even j.
    """
    import gguf.quants

    rows, n = blocks.shape[:2]
    flat = blocks.reshape(rows * n, -1)
    d, dmin = _f16(flat[:, :2]), _f16(flat[:, 2:4])
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(flat[:, 4:16]))
    scale = d * sc.astype(np.float32)  # [blocks, 8]
    offset = dmin * m.astype(np.float32)
    qs = flat[:, 16:].reshape(-1, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(rows, n * 8, BLOCK)
    return codes, scale.reshape(rows, -1), (8 * scale - offset).reshape(rows, -1)


_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
_INT4_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def save_weights(weights: dict[str, QuantWeight], path: Path) -> None:
    """Keep decoded weights beside the converted copy: parsing the GGUF header alone takes seconds (its vocab)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name, weight in weights.items():
        codes = weight.codes
        if weight.bits == 4:  # two codes a byte on disk
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
        tensors[f"{name}.codes"] = codes.contiguous()
        tensors[f"{name}.scale"] = weight.scale.contiguous()
        if weight.zero is not None:
            tensors[f"{name}.zero"] = weight.zero.contiguous()
        metadata[name] = f"{weight.group_size}:{weight.source}"
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.rename(path)


def load_weights(path: Path) -> dict[str, QuantWeight]:
    from safetensors import safe_open

    weights = {}
    with safe_open(str(path), framework="pt") as file:
        for name, value in (file.metadata() or {}).items():
            group, source = value.split(":", 1)
            codes = file.get_tensor(f"{name}.codes")
            zero = file.get_tensor(f"{name}.zero") if int(group) else None
            if int(group):
                codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(codes.shape[0], -1)
            weights[name] = QuantWeight(codes, file.get_tensor(f"{name}.scale"), zero, int(group), source)
    return weights
