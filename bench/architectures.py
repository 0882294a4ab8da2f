"""`python bench/architectures.py`: which runner path each architecture takes, and whether its greedy output is
transformers' own `generate`, token for token.

Tiny random-weight models built from a config (vocabulary 1000, 2 layers), loaded as the worker loads a model, the
runner chosen as the engine chooses it (worker/runners.py). Three sequences run as the scheduler would run them: the
first two prefilled together, the third's 40-token prompt in chunks of 16 beside their decodes, then all decoding;
each sequence's 16 greedy tokens are compared with `model.generate` on its prompt alone.
Repeat: `.venv/bin/python bench/architectures.py [model_type ...]`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.models import LoadedModel, ModelLoadError, context_length  # noqa: E402
from worker.runner import SeqChunk  # noqa: E402
from worker.runners import choose_runner  # noqa: E402

VOCAB, BLOCK, NEW_TOKENS = 1000, 16, 16
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(LLAMA_LIKE, num_key_value_heads=2),
    "qwen2": dict(LLAMA_LIKE, num_key_value_heads=2),
    "gemma": dict(LLAMA_LIKE, num_key_value_heads=2, head_dim=16),
    "gemma2": dict(LLAMA_LIKE, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "gemma3_text": dict(LLAMA_LIKE, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "phi": LLAMA_LIKE,
    "phi3": dict(LLAMA_LIKE, num_key_value_heads=2, pad_token_id=0),
    "phi3 (longrope)": dict(
        LLAMA_LIKE,
        num_key_value_heads=2,
        pad_token_id=0,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    ),
    "stablelm": dict(LLAMA_LIKE, num_key_value_heads=2),
    "olmo2": dict(LLAMA_LIKE, num_key_value_heads=2),
    "starcoder2": dict(LLAMA_LIKE, num_key_value_heads=2),
    "cohere": dict(LLAMA_LIKE, num_key_value_heads=2),
    "granite": dict(LLAMA_LIKE, num_key_value_heads=2),
    "mixtral": dict(LLAMA_LIKE, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        LLAMA_LIKE, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "gpt_neox": LLAMA_LIKE,
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4),
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8),
}


def build(name: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = name.split(" ")[0]
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **{**ids, **CONFIGS[name]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(
        model=model,
        tokenizer=None,  # type: ignore[arg-type]  # the runners never read it
        name=name,
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=context_length(config),
        load_seconds=0.0,
        eos_token_ids={2},
        format="safetensors",
    )


def serve(runner: Any, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of each prompt, run as described in the module docstring; blocks never shared."""
    per_seq = -(-(max(map(len, prompts)) + NEW_TOKENS) // BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    seqs, done = [list(p) for p in prompts], [0] * len(prompts)
    prefills = [[(0, len(prompts[0])), (1, len(prompts[1]))], [(2, 16)], [(2, 16)], [(2, len(prompts[2]) - 32)]]

    def decoding(i: int) -> bool:
        return done[i] >= len(prompts[i]) and len(seqs[i]) - len(prompts[i]) < NEW_TOKENS

    while prefills or any(decoding(i) for i in range(len(prompts))):
        step = [(i, 1) for i in range(len(prompts)) if decoding(i)] + (prefills.pop(0) if prefills else [])
        chunks = [
            SeqChunk(seqs[i][done[i] : done[i] + n], done[i], tables[i], prompt=done[i] < len(prompts[i]), key=i)
            for i, n in step
        ]
        for (i, n), row in zip(step, runner.forward(chunks), strict=True):
            done[i] += n
            if done[i] == len(seqs[i]):
                seqs[i].append(int(row.argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def generated(model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    output = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    return output[0, len(prompt) :].tolist()


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    names = sys.argv[1:] or list(CONFIGS)
    prompts = [[(11 * i + 5 * s + 3) % VOCAB for i in range(n)] for s, n in enumerate((12, 20, 40))]
    print("| architecture | path | greedy = generate |")
    print("|---|---|---|")
    for name in names:
        try:
            loaded = build(name)
            chosen = choose_runner(loaded, 64 << 20, BLOCK)
        except (ModelLoadError, ValueError, TypeError) as exc:
            print(f"| {name} | refused: {str(exc)[:150]} | - |", flush=True)
            continue
        ours = serve(chosen.runner, prompts)
        want = [generated(loaded.model, p) for p in prompts]
        matches = sum(a == b for a, b in zip(ours, want, strict=True))
        print(f"| {name} | {chosen.path} | {matches} of {len(prompts)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
