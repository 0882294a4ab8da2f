"""GPTQ, AWQ and compressed-tensors checkpoints, written here in each format's documented layout, load onto kernels.

No such checkpoint can be downloaded on these machines, so each test packs a small Llama's weights itself, as
AutoGPTQ, AutoAWQ and compressed-tensors pack them (tests/prequantized_writer.py), and checks what the loader makes
of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.prequantized_writer import write_checkpoint as write_tiny
from worker import quant
from worker.catalog import read_entry
from worker.models import LoadedModel, load_model
from worker.prequantized import load_prequantized, quant_method
from worker.runner import ModelRunner, SeqChunk, _SplitLinear

GROUP = 32
CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.2)
    return model


def write_checkpoint(folder: Path, method: str, act_order: bool = False) -> dict[str, torch.Tensor]:
    """The tiny model packed in `method`'s layout; returns the dense weight each quantized module stands for."""
    return write_tiny(folder, tiny_model(), method, GROUP, act_order=("q_proj",) if act_order else ())


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_checkpoint_loads_onto_the_int4_kernel_with_the_weights_it_packs(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quant, "INT4_AS_INT8_MAX_BYTES", 0)  # int4 kernels, as a model too big for int8 rows runs
    expected = write_checkpoint(tmp_path, method)
    assert quant_method(tmp_path) == method
    model, weights, label = load_prequantized(tmp_path, torch.float32)
    assert label == f"{method.upper()}-INT4"
    assert set(weights) == set(expected)
    modules = dict(model.named_modules())
    for name, dense in expected.items():
        assert weights[name].bits == 4 and weights[name].group_size == GROUP
        torch.testing.assert_close(weights[name].dequantize(), dense, atol=1e-6, rtol=0)
        torch.testing.assert_close(modules[name].weight, dense, atol=1e-6, rtol=0)  # the dequantized fallback
    runner = ModelRunner(model, device=torch.device("cpu"), dtype=torch.float32, num_blocks=8, quantized=weights)
    assert isinstance(runner.layers[0].qkv, _SplitLinear) and isinstance(runner.layers[1].down, _SplitLinear)
    dense_runner = ModelRunner(model, device=torch.device("cpu"), dtype=torch.float32, num_blocks=8)
    ids = list(range(3, 40))
    results = []
    for each in (runner, dense_runner):  # a prompt, then a decode step: decode rows run on the int4 kernel
        each.forward([SeqChunk(ids[:-1], 0, [0, 1, 2], prompt=True)])
        results.append(each.forward([SeqChunk(ids[-1:], len(ids) - 1, [0, 1, 2])])[0])
    # Not equal: the kernel rounds activations to int8 per block of 32 (to bf16 on a CPU without AVX512-VNNI).
    assert torch.nn.functional.cosine_similarity(results[0], results[1], dim=0) > 0.999


def test_act_order_gptq_is_dequantized_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker.prequantized")
    expected = write_checkpoint(tmp_path, "gptq", act_order=True)
    model, weights, _ = load_prequantized(tmp_path, torch.float32)
    act_order = [name for name in expected if name.endswith("q_proj")]
    assert not set(act_order) & set(weights) and len(weights) == len(expected) - len(act_order)
    assert "2 of 14 gptq weights have no int4/int8 kernel layout" in caplog.text
    modules = dict(model.named_modules())
    for name in act_order:
        torch.testing.assert_close(modules[name].weight, expected[name], atol=1e-6, rtol=0)


def test_load_model_serves_a_gptq_folder_and_labels_it(tmp_path: Path, loaded_fp32: LoadedModel) -> None:
    write_checkpoint(tmp_path, "gptq")
    loaded_fp32.tokenizer.save_pretrained(tmp_path)  # any tokenizer: the test runs no text through the tiny model
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    card = loaded.card()
    assert (card.format, card.quantization) == ("gptq", "GPTQ-INT4")
    listed = read_entry(None, str(tmp_path)).card  # what /api/tags and /api/ps show before and while it is loaded
    assert (listed.format, listed.quantization) == (card.format, card.quantization)
    assert len(loaded.quantized) == 14
    dense = load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path / "cache", quantize="none")
    assert dense.quantized == {} and dense.card().quantization == ""
