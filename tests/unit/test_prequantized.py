"""GPTQ, AWQ and compressed-tensors checkpoints, written here in each format's documented layout, load onto kernels.

No such checkpoint can be downloaded on these machines, so each test packs a small Llama's weights itself, as
AutoGPTQ, AutoAWQ and compressed-tensors pack them, and checks what the loader makes of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from worker.models import LoadedModel, load_model
from worker.prequantized import AWQ_ORDER, load_prequantized, quant_method
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
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """uint4 codes -> int32 words of 8, nibble j = the j-th code along `dim` (the layout all three formats use)."""
    values = codes.numpy().astype(np.uint32)
    if dim == 0:
        values = values.reshape(-1, 8, values.shape[1]).transpose(0, 2, 1)  # [words, cols, 8]
    else:
        values = values.reshape(values.shape[0], -1, 8)
    words = sum(values[..., j] << np.uint32(4 * j) for j in range(8))
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int32))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.2)
    return model


def quantize_groups(weight: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [out, in] 0..15, fp16 scale [out, groups], integer zero [out, groups]: w = scale * (codes - zero)."""
    groups = weight.view(weight.shape[0], -1, GROUP)
    if symmetric:
        scale = (groups.abs().amax(-1) * 2 / 15).half().float()
        zero = torch.full_like(scale, 8)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).half().float()
        zero = torch.round(-low / scale).clamp(1, 15)  # >= 1: GPTQ v1 stores zero - 1
    codes = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, 15)
    return codes.view_as(weight).to(torch.uint8), scale, zero


def write_checkpoint(folder: Path, method: str, act_order: bool = False) -> dict[str, torch.Tensor]:
    """The tiny model packed in `method`'s layout; returns the dense weight each quantized module stands for."""
    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    expected: dict[str, torch.Tensor] = {}
    for name, _module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJECTIONS:
            continue
        weight = state.pop(f"{name}.weight")
        codes, scale, zero = quantize_groups(weight, symmetric=method != "awq")
        g_idx = torch.arange(weight.shape[1]) // GROUP
        if act_order and name.endswith("q_proj"):  # groups interleaved along the input, as desc_act makes them
            g_idx = torch.arange(weight.shape[1]) % (weight.shape[1] // GROUP)
            codes = torch.round(weight / scale[:, g_idx] + zero[:, g_idx]).clamp(0, 15).to(torch.uint8)
        expected[name] = scale[:, g_idx] * (codes.float() - zero[:, g_idx])
        if method == "gptq":
            state[f"{name}.qweight"] = pack(codes.t().contiguous(), dim=0)
            state[f"{name}.qzeros"] = pack((zero - 1).to(torch.uint8).t().contiguous(), dim=1)
            state[f"{name}.scales"] = scale.t().half().contiguous()
            state[f"{name}.g_idx"] = g_idx.to(torch.int32)
        elif method == "awq":
            order = torch.tensor(AWQ_ORDER)

            def awq_pack(values: torch.Tensor, order: torch.Tensor = order) -> torch.Tensor:
                return pack(values.view(values.shape[0], -1, 8)[:, :, order].reshape(values.shape[0], -1), dim=1)

            state[f"{name}.qweight"] = awq_pack(codes.t().contiguous())
            state[f"{name}.qzeros"] = awq_pack(zero.to(torch.uint8).t().contiguous())
            state[f"{name}.scales"] = scale.t().half().contiguous()
        else:  # compressed-tensors pack-quantized, symmetric: codes stored plus 8
            state[f"{name}.weight_packed"] = pack(codes, dim=1)
            state[f"{name}.weight_scale"] = scale.half()
            state[f"{name}.weight_shape"] = torch.tensor(list(weight.shape))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": True},
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized"},
    }[method]
    (folder / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_checkpoint_loads_onto_the_int4_kernel_with_the_weights_it_packs(method: str, tmp_path: Path) -> None:
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
    # Not equal: the kernel takes bf16 activations.
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
    assert len(loaded.quantized) == 14
    dense = load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path / "cache", quantize="none")
    assert dense.quantized == {} and dense.card().quantization == ""
