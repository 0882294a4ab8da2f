"""Which weights a worker serves on integer kernels (`--quantize`), and the label that tells the truth about them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from worker.gguf_weights import load_weights, read_gguf_weights, save_weights
from worker.quant import QuantWeight, quantize_model

logger = logging.getLogger(__name__)

KEPT_WEIGHTS = "quantized.safetensors"  # beside a GGUF file's converted copy: its integer weights, decoded


def served_weights(
    model: torch.nn.Module, quantize: str, info: dict[str, Any], device: torch.device
) -> tuple[dict[str, QuantWeight], str]:
    """The integer weights to serve by module name, and the model card's `quantization` ("" when all dense).

    `info` is what `models._load` learnt about the source: its format, the GGUF type or checkpoint method, where a
    GGUF file and its converted copy are, and a prequantized checkpoint's weights.
    """
    native = info.get("quantization", "")
    if quantize == "none":
        return {}, ""
    if device.type != "cpu":
        if quantize != "auto" or native:
            logger.warning("int8/int4 kernels run on CPU only here: serving dense %s weights", device.type)
        return {}, ""
    if quantize in ("int8", "int4"):
        started = time.perf_counter()
        weights = quantize_model(model, quantize)
        logger.info("quantized %d weights to %s in %.1f s", len(weights), quantize, time.perf_counter() - started)
        return weights, quantize.upper()
    if info.get("format") == "gguf" and native:
        config = getattr(model, "config", None)
        return _gguf_weights(Path(info["source"]), config, Path(info["cache_folder"])), native
    if "quantized" in info:  # GPTQ, AWQ, compressed-tensors
        return info["quantized"], native
    return {}, ""


def _gguf_weights(path: Path, config: Any, folder: Path) -> dict[str, QuantWeight]:
    """The GGUF file's integer weights, decoded once and kept beside its converted copy (0.1 s instead of 2-3 s)."""
    kept = folder / KEPT_WEIGHTS
    if kept.is_file():
        try:
            started = time.perf_counter()
            weights = load_weights(kept)
        except (OSError, ValueError, RuntimeError) as exc:
            logger.warning("the kept integer weights %s are unusable (%s); decoding the file again", kept, exc)
        else:
            logger.info(
                "loaded %d integer weights from %s in %.1f s", len(weights), kept, time.perf_counter() - started
            )
            return weights
    weights = read_gguf_weights(path, config)
    try:
        save_weights(weights, kept)
    except OSError as exc:  # a read-only or full cache: serve anyway
        logger.warning("could not keep the integer weights in %s: %s", kept, exc)
    return weights
