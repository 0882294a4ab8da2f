"""What the worker reports of its memory: on CPU, the process's resident memory within the host's RAM."""

from __future__ import annotations

import torch

from worker.memory import MemoryGauge


def test_cpu_memory_is_the_processs_within_the_hosts() -> None:
    gauge = MemoryGauge(torch.device("cpu"))
    used, total = gauge.read()
    assert 0 < used < total
    assert gauge.num_accelerators == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
