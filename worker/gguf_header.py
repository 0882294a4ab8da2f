"""Read a GGUF file's header: its metadata (arrays only as their length) and its tensor shapes, in milliseconds,
without the `gguf` package's reader (which maps every tensor and the whole vocabulary first: ~1.5 s a file)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any


class GGUFError(Exception):
    """Not a GGUF file this reader understands."""


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# llama.cpp's LLAMA_FTYPE values that name a quantization (general.file_type), for files named without one.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 12: "Q3_K_M"}
FILE_TYPES |= {14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


def read_gguf(path: Path) -> tuple[dict[str, Any], list[list[int]]]:
    """The metadata (arrays as their length) and the tensor shapes of a GGUF file (format v2/v3), from its header."""
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader = _Reader(data)
            if data[:4] != b"GGUF" or reader.unpack("<4xI")[0] < 2:
                raise GGUFError(f"not a GGUF file (v2 or later): {path}")
            num_tensors, num_fields = reader.unpack("<QQ")
            fields = {reader.string(): reader.value(reader.unpack("<I")[0]) for _ in range(num_fields)}
            shapes = []
            for _ in range(num_tensors):
                reader.string()
                (num_dims,) = reader.unpack("<I")
                shapes.append(list(reader.unpack(f"<{num_dims}Q")))
                reader.unpack("<IQ")  # type, offset
            return fields, shapes
    except (OSError, ValueError, struct.error, KeyError, UnicodeDecodeError) as exc:
        raise GGUFError(f"unreadable GGUF file {path}: {exc}") from None


class _Reader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.offset = data, 0

    def unpack(self, layout: str) -> tuple[Any, ...]:
        values = struct.unpack_from(layout, self.data, self.offset)
        self.offset += struct.calcsize(layout)
        return values

    def string(self) -> str:
        (size,) = self.unpack("<Q")
        self.offset += size
        return bytes(self.data[self.offset - size : self.offset]).decode()

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:  # skipped: only its length is kept (the vocabulary's size)
            item, count = self.unpack("<IQ")
            if item == _STRING:
                for _ in range(count):
                    (size,) = self.unpack("<Q")  # (not `offset += unpack(…)`: that adds to the offset before the read)
                    self.offset += size
            elif item == _ARRAY:
                raise ValueError("nested GGUF arrays are not read")
            else:
                self.offset += struct.calcsize(_SCALARS[item]) * count
            return count
        return self.unpack("<" + _SCALARS[kind])[0]
