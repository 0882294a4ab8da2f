"""Quantized weights: GGUF block decoders, int8/int4 quantizers, the kernels against a dense matmul, GGUF loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tests.gguf_writer import T, encode, write_requantized
from worker import gguf_weights
from worker.gguf_weights import decode, read_gguf_weights
from worker.models import LoadedModel, default_model_path
from worker.quant import QuantLinear, QuantWeight, kernel_works, quantize_int4, quantize_int8, quantize_model


def weight(rows: int = 64, cols: int = 512) -> np.ndarray:
    """The same values every run, whichever tests run before it (a seeded generator of its own)."""
    values = (np.random.default_rng(0).standard_normal((rows, cols)) * 0.05).astype(np.float32)
    values[3, 7] = 0.9  # an outlier, as real weights have
    return values


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_4_bit_gguf_blocks_decode_exactly_into_int4_codes(qtype: T) -> None:
    blocks = encode(weight(), qtype)
    ours = decode(qtype.name, blocks, 512)
    assert (ours.bits, ours.group_size, ours.source) == (4, 32, qtype.name)
    assert int(ours.codes.max()) <= 15
    reference = gguf_weights_reference(blocks, qtype)
    np.testing.assert_allclose(ours.dequantize().numpy(), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q6_K, T.Q5_0])
def test_other_gguf_types_become_int8_rows_within_half_a_step(qtype: T) -> None:
    blocks = encode(weight(), qtype)
    ours = decode(qtype.name, blocks, 512)
    assert ours.bits == 8 and ours.codes.dtype == torch.int8
    error = np.abs(ours.dequantize().numpy() - gguf_weights_reference(blocks, qtype))
    assert (error <= ours.scale.numpy()[:, None] / 2 + 1e-6).all()


def gguf_weights_reference(blocks: np.ndarray, qtype: T) -> np.ndarray:
    import gguf.quants

    return gguf.quants.dequantize(blocks, qtype).reshape(blocks.shape[0], -1)


def test_int8_and_int4_quantizers_round_to_the_nearest_level() -> None:
    dense = torch.from_numpy(weight())
    int8 = quantize_int8(dense)
    assert (int8.dequantize() - dense).abs().le(int8.scale[:, None] / 2 + 1e-6).all()
    int4 = quantize_int4(dense, group_size=32)
    step = int4.scale.repeat_interleave(32, dim=1)
    assert (int4.dequantize() - dense).abs().le(step / 2 + 1e-6).all()
    # A group's extremes are representable: nothing is clipped.
    assert int4.codes.min() == 0 and int4.codes.max() == 15


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_a_dense_matmul_of_the_same_weight(bits: int, dtype: torch.dtype) -> None:
    dense = torch.from_numpy(weight(96, 256))
    quantized = quantize_int8(dense) if bits == 8 else quantize_int4(dense)
    assert kernel_works(quantized)
    generator = torch.Generator().manual_seed(0)
    bias, residual = torch.randn(96, generator=generator).to(dtype), torch.randn(5, 96, generator=generator).to(dtype)
    x = torch.randn(5, 256, generator=generator).to(dtype)
    out = QuantLinear([quantized], bias, dtype)(x, residual)
    assert out.dtype == dtype
    # The kernels take bf16 activations and scales; the reference is the same computation in float32.
    scale = quantized.scale.to(torch.bfloat16).float()
    reference_weight = QuantWeight(quantized.codes, scale, quantized.zero, quantized.group_size).dequantize()
    expected = x.bfloat16().float() @ reference_weight.t() + bias.float() + residual.float()
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_fused_parts_of_different_kinds_run_one_kernel_each() -> None:
    """Q4_K_M keeps attn_v at 6 bits (int8 here) beside q and k in Q4_K (int4): the fused qkv splits its calls."""
    generator = torch.Generator().manual_seed(0)
    parts = [
        quantize_int4(torch.randn(64, 128, generator=generator)),
        quantize_int4(torch.randn(32, 128, generator=generator)),
        quantize_int8(torch.randn(32, 128, generator=generator)),
    ]
    linear = QuantLinear(parts, None, torch.float32)
    assert [k.name for k in linear.kernels] == ["int4 g32 (int4)", "int8 (int8)"]
    x = torch.randn(3, 128, generator=generator)
    expected = x.bfloat16().float() @ torch.cat([p.dequantize() for p in parts]).t()
    torch.testing.assert_close(linear(x), expected, atol=0.1, rtol=0.02)


def test_shipped_q4_1_file_loads_as_the_same_weights_transformers_dequantizes(loaded_fp32: LoadedModel) -> None:
    """Name mapping and llama's q/k row order: every int4 weight equals the HF module's dequantized weight exactly."""
    weights = read_gguf_weights(default_model_path(), loaded_fp32.model.config)
    modules = dict(loaded_fp32.model.named_modules())
    assert len(weights) == 30 * 7 + 1
    for name, quantized in weights.items():
        reference = modules[name].weight.float()
        if name == "lm_head":  # the tied Q8_0 embedding, requantized to int8 rows
            assert quantized.bits == 8 and quantized.source == "Q8_0"
            assert (quantized.dequantize() - reference).abs().max() <= quantized.scale.max() / 2 + 1e-6
        else:
            assert quantized.source == "Q4_1"
            torch.testing.assert_close(quantized.dequantize(), reference, atol=0, rtol=0)


def test_written_k_quant_file_maps_each_tensor_like_transformers(tmp_path: Path) -> None:
    """A GGUF file with Q4_K, Q6_K, Q5_0 and Q8_0 tensors (what a Q4_K_M file of this model holds) reads back right;
    llama's q/k row order is undone as transformers undoes it."""
    import gguf

    types = {
        "blk.0.attn_q.weight": T.Q8_0,
        "blk.0.attn_k.weight": T.Q5_0,
        "blk.0.ffn_down.weight": T.Q4_K,  # k-quants need rows of 256: only ffn_down (1536 wide) has them here
        "blk.1.ffn_down.weight": T.Q6_K,
    }
    path = write_requantized(default_model_path(), tmp_path / "mixed.gguf", lambda name, shape: types.get(name))
    weights = read_gguf_weights(path, SmallConfig())
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    modules = {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj",
        "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj",
    }
    for gguf_name, module in modules.items():
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == types[gguf_name]
        dense = gguf_weights_reference(np.asarray(tensor.data), tensor.tensor_type)
        expected = torch.from_numpy(processor.process(dense, gguf_name).weights)
        ours = weights[module]
        assert ours.source == tensor.tensor_type.name
        assert ours.bits == (4 if tensor.tensor_type == T.Q4_K else 8)
        tolerance = 1e-6 if ours.bits == 4 else float(ours.scale.max()) / 2 + 1e-6
        torch.testing.assert_close(ours.dequantize(), expected, atol=tolerance, rtol=0)


class SmallConfig:
    num_attention_heads = 9  # SmolLM2-135M's heads
    num_key_value_heads = 3


def test_quantize_model_covers_every_projection_and_keeps_the_lm_head_at_8_bits(loaded_fp32: LoadedModel) -> None:
    weights = quantize_model(loaded_fp32.model, "int4")
    assert len(weights) == 30 * 7 + 1
    assert weights["lm_head"].bits == 8
    assert {w.bits for name, w in weights.items() if name != "lm_head"} == {4}


def test_unknown_gguf_tensor_names_are_not_linear_layers() -> None:
    assert gguf_weights._module_name("blk.3.attn_norm.weight", True) is None
    assert gguf_weights._module_name("token_embd.weight", True) is None  # an untied model has output.weight
    assert gguf_weights._module_name("token_embd.weight", False) == "lm_head"
    assert gguf_weights._module_name("blk.12.ffn_up.weight", False) == "model.layers.12.mlp.up_proj"
