"""Decode attention read in place from the paged KV cache: a small C++ kernel (paged_attention.cpp), built here.

The runner's portable decode path gathers every sequence's K/V blocks into one batch before two matmuls: at 64
sequences that copy and the reads after it were ~40 % of a decode step on a 2-core EPYC. The kernel reads each
position once, from the block its table names. It is compiled on first use with torch's extension builder (a C++
compiler and ninja; ~20 s, cached under ~/.cache/torch_extensions, keyed by this CPU's flags since it is built with
-march=native) and checked against the matmul path on a small case; where any of that fails the runner keeps the
matmul path and the log says why. `TANDEM_ATTENTION_KERNEL=0` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.cpp")
# -ffast-math lets the compiler vectorize the dot products (it may reorder their sums: fixed per build, so results
# stay deterministic); finite-math stays off because masked softmax inputs may be -inf elsewhere.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only"]

# q [B, KVH, G, D], k_blocks, v_blocks [KVH * NB, BS, D], tables [B, MB], contexts [B], scale → [B, KVH, G, D]
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_kernel: DecodeKernel | None = None
_tried = False


def decode_kernel() -> DecodeKernel | None:
    """The kernel, built and checked once per process; None where it is off or cannot be built here."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        _kernel = _build()
    return _kernel


def _build() -> DecodeKernel | None:
    if os.environ.get("TANDEM_ATTENTION_KERNEL", "1") == "0":
        logger.info("paged attention kernel off (TANDEM_ATTENTION_KERNEL=0): decode attention gathers K/V")
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        module = load(name=f"tandem_paged_attention_{_cpu_key()}", sources=[str(SOURCE)], extra_cflags=CFLAGS)
        kernel: DecodeKernel = module.decode
        if not _agrees(kernel):
            logger.warning("paged attention kernel disagrees with the matmul path here; not used")
            return None
    except Exception as exc:  # no compiler, no ninja, a build error: the matmul path serves
        logger.warning("paged attention kernel unavailable (%s); decode attention gathers K/V instead", exc)
        return None
    logger.info("paged attention kernel ready: decode attention reads the KV blocks in place")
    return kernel


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's binary sits beside the venv's Python, which a worker started
    as `.venv/bin/python -m worker` does not have on its PATH."""
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return  # a system ninja may still be on PATH
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def _cpu_key() -> str:
    """A short digest of this CPU's model and instruction-set flags: a build is never loaded on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]


def _agrees(kernel: DecodeKernel) -> bool:
    """One small case against plain torch (fixed values: the global RNG that seeded sampling relies on stays put)."""
    kv_heads, group, dim, block_size, num_blocks = 2, 3, 8, 4, 5
    cache = torch.linspace(-1.0, 1.0, 2 * kv_heads * num_blocks * block_size * dim).view(2, -1, block_size, dim)
    k_blocks, v_blocks = cache[0].contiguous(), cache[1].flip(-1).contiguous()
    q = torch.linspace(-2.0, 2.0, 2 * kv_heads * group * dim).view(2, kv_heads, group, dim)
    tables, contexts = torch.tensor([[3, 1], [0, 4]]), torch.tensor([6, 3])
    out = kernel(q, k_blocks, v_blocks, tables, contexts, dim**-0.5)
    for b in range(2):
        positions = torch.arange(int(contexts[b]))
        slots = tables[b][positions // block_size] * block_size + positions % block_size
        for h in range(kv_heads):
            k = k_blocks[h * num_blocks :].reshape(-1, dim)[slots]
            v = v_blocks[h * num_blocks :].reshape(-1, dim)[slots]
            expected = torch.softmax(q[b, h] @ k.T * dim**-0.5, dim=-1) @ v
            if not torch.allclose(out[b, h], expected, atol=1e-5):
                return False
    return True
