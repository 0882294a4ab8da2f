"""How much memory a model will need, how much is free (RAM from /proc/meminfo, a GPU's from NVML), and how much
a worker process holds. Estimates, not promises: the budget keeps loads from running the machine out of memory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.cpu import cpu_has_bf16
from worker.catalog import Entry

logger = logging.getLogger("launcher")

PROCESS_BYTES = 2**30  # a worker's resident set before any weight: Python, torch and its libraries, tokenizer
DEFAULT_KV_BYTES = 2 << 30  # worker --kv-cache-bytes default (the KV cache is allocated whole at start)
UNKNOWN = 2**62  # free memory that cannot be read: the count budget alone decides


def estimate(entry: Entry, *, on_gpu: bool, dtype: str, kv_cache_bytes: int) -> int:
    """Bytes one worker of `entry` holds once loaded: the weights in their dtype, the KV cache (allocated whole on
    CPU; on a GPU it is a fraction of what is free and not counted), and the process itself."""
    card = entry.card
    if entry.is_embedding or dtype in ("float32", "fp32"):
        per_parameter = 4  # encoders run in float32 unless told otherwise (worker/embedder.py)
    elif on_gpu or dtype in ("bfloat16", "bf16", "float16", "fp16", "half") or cpu_has_bf16():
        per_parameter = 2
    else:
        per_parameter = 4
    weights = card.num_parameters * per_parameter or card.size_bytes
    kv = 0 if entry.is_embedding or on_gpu else kv_cache_bytes
    return weights + kv + PROCESS_BYTES


def free_ram() -> int:
    """MemAvailable: what can be had without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return UNKNOWN


@contextmanager
def _nvml() -> Iterator[Any]:
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def gpu_count() -> int:
    try:
        with _nvml() as nvml:
            return int(nvml.nvmlDeviceGetCount())
    except Exception:  # no NVML library, no driver
        return 0


def free_gpu_memory() -> int:
    """The most free bytes on any one GPU (a worker on `--device auto` goes to the freest)."""
    try:
        with _nvml() as nvml:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            return max((int(nvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles), default=UNKNOWN)
    except Exception:
        return UNKNOWN


def process_memory(pid: int, *, on_gpu: bool) -> tuple[int, int]:
    """(resident bytes, GPU bytes) of a process; 0 where unreadable."""
    resident = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                resident = int(line.split()[1]) * 1024
    except OSError:
        pass
    vram = 0
    if on_gpu:
        try:
            with _nvml() as nvml:
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if process.pid == pid and process.usedGpuMemory:
                            vram += int(process.usedGpuMemory)
        except Exception as exc:
            logger.debug("NVML unavailable: %s", exc)
    return resident, vram
