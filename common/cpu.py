"""What the CPU can do, read without torch (the supervisor estimates memory by dtype; the worker picks the dtype)."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """Without AVX512-BF16 or AMX, bf16 matmuls are emulated and several times slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags
