"""Our C++ CPU kernels (worker/csrc/): compiled for this machine on first use, then loaded from a cache.

`paged_decode_attention` reads the paged KV cache in place (csrc/paged_attention.cpp); `rms_norm`, `silu_mul`,
`rotary` and `write_kv` are a decoder layer's small steps, each in one pass (csrc/fused_ops.cpp); `int4_gemm` and
`int8_gemm` multiply by integer weights (csrc/quant_gemm.cpp, AVX512-BF16 CPUs only). The library is
compiled with `-march=native`, so a build is keyed by everything that shapes it: the sources, torch's version,
the compiler and this CPU's feature flags. Builds land in `$TANDEM_CACHE_DIR/native` (the worker's cache folder,
~/.cache/tandem by default); `make` builds it at install (`python -m worker.native`) so no worker waits for it.
Without a compiler, or with TANDEM_NATIVE=0, the runner keeps its torch ops: slower, never wrong.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

SOURCE_FOLDER = Path(__file__).with_name("csrc")
SOURCES = sorted(SOURCE_FOLDER.glob("*.cpp"))
# -fopenmp: at::parallel_for is inline OpenMP; the library then links libgomp.so.1, which resolves to torch's own
# copy (already loaded), so the kernel and torch share one thread pool.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20"]
BUILD_TIMEOUT_S = 600


@dataclass(frozen=True)
class Kernels:
    """The library's ops; each writes its last argument, `out` (signatures in worker/csrc/*.cpp)."""

    paged_decode_attention: Callable[..., None]
    rms_norm: Callable[..., None]
    silu_mul: Callable[..., None]
    rotary: Callable[..., None]
    write_kv: Callable[..., None]
    int4_gemm: Callable[..., None]
    int8_gemm: Callable[..., None]
    w4a8_gemm: Callable[..., None]
    w8a8_gemm: Callable[..., None]
    quant_gemm: bool  # whether int4_gemm and int8_gemm work here: they need AVX512-BF16
    w4a8: bool  # whether w4a8_gemm and w8a8_gemm (int8 activations) work here: they need AVX512-VNNI too


def cache_folder() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", str(Path.home() / ".cache" / "tandem"))) / "native"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build_key(compiler_version: str) -> str:
    sources = [path.read_bytes() for path in sorted(SOURCE_FOLDER.iterdir()) if path.suffix in (".cpp", ".h")]
    parts = [*sources, torch.__version__.encode(), compiler_version.encode(), " ".join(FLAGS).encode()]
    parts.append(_cpu_flags().encode())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build() -> Path:
    """The compiled library for this machine, built now if the cache has none. Raises on any failure."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    target = cache_folder() / f"tandem_kernels-{_build_key(version)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # Built beside the target, then renamed: workers starting at once may each build, and none reads a half file.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as partial:
        partial_path = Path(partial.name)
    command = [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{folder}" for folder in cpp_extension.include_paths()),
        *(str(source) for source in SOURCES),
        "-o",
        str(partial_path),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        os.replace(partial_path, target)
    finally:
        partial_path.unlink(missing_ok=True)
    return target


@functools.cache
def kernels() -> Kernels | None:
    """The compiled ops, or None where they cannot be built (logged once, with why)."""
    if os.environ.get("TANDEM_NATIVE", "1") == "0":
        logger.info("native kernels off (TANDEM_NATIVE=0): the runner uses torch ops")
        return None
    try:
        torch.ops.load_library(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("native kernels unavailable, using torch ops (slower): %s", error)
        return None
    ops = torch.ops.tandem
    return Kernels(
        ops.paged_decode_attention,
        ops.rms_norm,
        ops.silu_mul,
        ops.rotary,
        ops.write_kv,
        ops.int4_gemm,
        ops.int8_gemm,
        ops.w4a8_gemm,
        ops.w8a8_gemm,
        bool(ops.quant_gemm_supported()),
        bool(ops.w4a8_supported()),
    )


def main() -> int:
    """`python -m worker.native`: build (or find) the library now, as `make` does at install."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if kernels() is None:
        return 0  # the runner works without them; the warning above says why they are missing
    print(f"native kernels: {build()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
