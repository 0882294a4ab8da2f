"""A model's generation defaults: its generation_config.json's own settings, overridden by --param."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from common.protocol import GenerationDefaults
from worker.defaults import generation_defaults, parse_params


class Model:
    def __init__(self, **config: object) -> None:
        self.generation_config = GenerationConfig(**config)


def test_only_what_the_models_file_sets_is_a_default() -> None:
    qwen3 = Model(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, bos_token_id=1)
    assert generation_defaults(qwen3, []) == GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20)
    assert generation_defaults(Model(bos_token_id=1), []) == GenerationDefaults()  # transformers' top_k 50 is not
    assert generation_defaults(Model(do_sample=False), []).temperature == 0.0  # a model that asks for greedy


def test_params_override_the_file_with_ollamas_names() -> None:
    params = ["temperature=0.2", "num_predict=128", "repeat_penalty=1.1", "stop=<|im_end|>", "stop=\n\n"]
    defaults = generation_defaults(Model(do_sample=True, temperature=0.6, top_p=0.95), params)
    assert defaults == GenerationDefaults(
        temperature=0.2, top_p=0.95, max_tokens=128, repetition_penalty=1.1, stop=["<|im_end|>", "\n\n"]
    )


@pytest.mark.parametrize("param", ["temperature", "mirostat=1", "temperature=hot"])
def test_a_bad_param_is_refused_naming_it(param: str) -> None:
    with pytest.raises(ValueError):
        parse_params([param])
    with pytest.raises(ValueError, match="out of range"):
        generation_defaults(Model(), ["temperature=300"])
