"""The layering the design promises: the gateway never loads torch or a worker module, the worker never loads the
gateway; both meet only in `common`."""

from __future__ import annotations

import subprocess
import sys


def loaded_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_the_gateway_loads_neither_torch_nor_the_worker() -> None:
    loaded = loaded_modules("gateway.app")
    assert "common" in loaded and not loaded & {"torch", "transformers", "worker"}


def test_the_worker_does_not_load_the_gateway() -> None:
    loaded = loaded_modules("worker.server") | loaded_modules("worker.__main__")
    assert "common" in loaded and "gateway" not in loaded
