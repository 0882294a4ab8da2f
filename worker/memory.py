"""How much memory the worker holds on its device, for /health and the seed services' info routes.

Read at most once a second: the engine describes itself after every step, and this must not cost a step anything.
"""

from __future__ import annotations

import os
import time

import torch

REFRESH_S = 1.0


class MemoryGauge:
    """(used, total) bytes: CUDA memory torch holds on a GPU; on CPU the process's resident memory and the RAM."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.num_accelerators = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self._read_at = -REFRESH_S
        self._value = (0, 0)

    def read(self) -> tuple[int, int]:
        now = time.monotonic()
        if now - self._read_at >= REFRESH_S:
            self._read_at, self._value = now, self._measure()
        return self._value

    def _measure(self) -> tuple[int, int]:
        if self.device.type == "cuda":
            _, total = torch.cuda.mem_get_info(self.device)
            return torch.cuda.memory_reserved(self.device), total
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            resident = 0
        return resident, os.sysconf("SC_PHYS_PAGES") * page
