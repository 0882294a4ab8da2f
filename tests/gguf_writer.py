"""Test and bench support: GGUF files of other quantization types, re-encoded from the shipped SmolLM2 file.

No other GGUF file is on these machines, so the Q8_0, Q4_0, Q4_K_M and Q6_K files that tests and bench/quality.py
load are made here: the shipped file's tensors are dequantized and re-encoded (gguf-py's encoders for the types it
has, the Q4_K and Q6_K encoders below for the k-quants it lacks), with its metadata and tokenizer copied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import gguf.quants
import numpy as np

QK_K = 256
T = gguf.GGMLQuantizationType


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(values.shape[0], -1)


def encode_q4_k(weight: np.ndarray) -> np.ndarray:
    """[out, in] float32 -> Q4_K blocks [out, in / 256 * 144]: w = d * sc_j * q - dmin * m_j per 32 weights."""
    rows = weight.shape[0]
    sub = weight.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(sub.min(axis=-1), 0)  # Q4_K offsets are subtracted, never added
    scale = (sub.max(axis=-1) - low) / 15
    d = np.maximum(scale.max(axis=-1), 1e-12) / 63
    dmin = np.maximum((-low).max(axis=-1), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-low / dmin[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    q = np.clip(np.round((sub + (dmin[:, None] * mn)[..., None]) / step[..., None]), 0, 15).astype(np.uint8)
    scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )
    pairs = q.reshape(-1, 4, 2, 32)  # chunk c holds sub-block 2c in low nibbles, 2c + 1 in high nibbles
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([_f16_bytes(d[:, None]), _f16_bytes(dmin[:, None]), scales, qs], axis=-1)
    return blocks.reshape(rows, -1)


def encode_q6_k(weight: np.ndarray) -> np.ndarray:
    """[out, in] float32 -> Q6_K blocks [out, in / 256 * 210]: w = d * sc_k * (q - 32) per 16 weights."""
    rows = weight.shape[0]
    blocks = weight.reshape(-1, QK_K).astype(np.float32)
    sub = blocks.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = (np.maximum(scale.max(axis=-1), 1e-12) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.round(sub / step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    h = high.reshape(-1, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d[:, None])], axis=-1)
    return out.reshape(rows, -1)


def encode(weight: np.ndarray, qtype: T) -> np.ndarray:
    """[out, in] float32 -> raw blocks of `qtype`, [out, bytes per row]."""
    if qtype == T.Q4_K:
        return encode_q4_k(weight)
    if qtype == T.Q6_K:
        return encode_q6_k(weight)
    return gguf.quants.quantize(weight.astype(np.float32), qtype)


def dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor of a GGUF file as float32 [out, in] (rows as stored, llama.cpp's q/k order)."""
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(
        int(tensor.shape[1]) if len(tensor.shape) > 1 else 1, -1
    )


# Per-tensor types of each file, as llama.cpp's quantize picks them for SmolLM2-135M: k-quants need rows of 256,
# and 576-wide rows (all but ffn_down) fall back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K), as llama.cpp does.
def q4_k_m_types(name: str, shape: tuple[int, ...]) -> T | None:
    if not name.endswith(".weight") or len(shape) < 2:
        return None
    if name == "token_embd.weight":
        return T.Q8_0
    k_quant = shape[0] % QK_K == 0
    layer = int(name.split(".")[1])
    if ".ffn_down." in name or ".attn_v." in name:  # Q4_K_M keeps some of these at 6 bits
        wide = T.Q6_K if layer % 3 == 0 else T.Q4_K
        return wide if k_quant else (T.Q8_0 if wide == T.Q6_K else T.Q5_0)
    return T.Q4_K if k_quant else T.Q5_0


def q6_k_types(name: str, shape: tuple[int, ...]) -> T | None:
    if not name.endswith(".weight") or len(shape) < 2:
        return None
    return T.Q6_K if shape[0] % QK_K == 0 and name != "token_embd.weight" else T.Q8_0


def uniform_types(qtype: T) -> Callable[[str, tuple[int, ...]], T | None]:
    def pick(name: str, shape: tuple[int, ...]) -> T | None:
        if not name.endswith(".weight") or len(shape) < 2:
            return None
        return T.Q8_0 if name == "token_embd.weight" else qtype

    return pick


FILE_TYPE_IDS = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
FILE_TYPE_IDS |= {"Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K}
FILE_TYPES: dict[str, Callable[[str, tuple[int, ...]], T | None]] = {
    "Q8_0": uniform_types(T.Q8_0),
    "Q4_0": uniform_types(T.Q4_0),
    "Q4_K_M": q4_k_m_types,
    "Q6_K": q6_k_types,
}


def write_file_type(source: Path, folder: Path, file_type: str) -> Path:
    """`folder/<source name>.<file_type>.gguf`, written once (a later call finds it)."""
    dest = folder / f"{source.stem.rsplit('.', 1)[0]}.{file_type}.gguf"
    if not dest.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        temporary = dest.with_suffix(".tmp")
        write_requantized(source, temporary, FILE_TYPES[file_type], FILE_TYPE_IDS[file_type])
        temporary.rename(dest)
    return dest


def write_requantized(
    source: Path, dest: Path, types: Callable[[str, tuple[int, ...]], T | None], file_type: int | None = None
) -> Path:
    """Copy `source` to `dest` with every matrix re-encoded to `types(name, gguf shape)` (None: copied as is)."""
    reader = gguf.GGUFReader(source)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = gguf.GGUFWriter(dest, architecture)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE and file_type is not None else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in tensor.shape)
        qtype = types(tensor.name, shape)
        if qtype is None or qtype == tensor.tensor_type:
            writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
        else:
            writer.add_tensor(tensor.name, encode(dequantized(tensor), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def write_metadata(dest: Path, architecture: str, add: Callable[[gguf.GGUFWriter], None]) -> Path:
    """A GGUF file with the metadata `add` writes (gguf-py's own `add_*`, so the keys have llama.cpp's types) and no
    tensors: what a header reader reads."""
    writer = gguf.GGUFWriter(dest, architecture)
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
