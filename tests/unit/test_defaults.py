"""A model's generation defaults: its generation_config.json's own settings, overridden by --param; the launcher's
--param, for every chat model or one."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest
from transformers import GenerationConfig

import launcher
from common.protocol import GenerationDefaults, ModelCard
from supervisor import config as launcher_config
from tests.gguf_writer import write_metadata
from worker import __main__ as worker_main
from worker.catalog import Entry
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


def sampling_keys(writer: gguf.GGUFWriter) -> None:
    writer.add_sampling_temp(0.6)
    writer.add_sampling_top_p(0.95)
    writer.add_sampling_top_k(20)
    writer.add_sampling_min_p(0.05)
    writer.add_sampling_penalty_repeat(1.1)
    writer.add_sampling_mirostat(2)  # a sampler tandem does not run: not a default


def test_a_gguf_files_recommended_sampling_is_the_models_default_under_param(tmp_path: Path) -> None:
    path = write_metadata(tmp_path / "tiny.gguf", "llama", sampling_keys)
    assert generation_defaults(Model(), [], path) == GenerationDefaults(
        temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1
    )
    over = generation_defaults(Model(do_sample=True, temperature=0.9, top_k=40), ["top_k=50"], path)
    assert (over.temperature, over.top_k) == (0.6, 50)  # over generation_config, under --param
    plain = write_metadata(tmp_path / "plain.gguf", "llama", lambda writer: None)
    assert generation_defaults(Model(), [], plain) == GenerationDefaults()


# -- the launcher's --param: every chat model, or one ----------------------------------------------


def test_launcher_param_reaches_every_chat_worker_or_the_one_model_named(caplog: pytest.LogCaptureFixture) -> None:
    flags = ["--device=cpu", "--param=temperature=0.3", "--param", "qwen3:8b:top_k=20", "--param=QWEN3:8B:stop=a:b=c"]
    config = launcher_config.parse_args([*flags, "--param=nope:top_p=0.5", "--worker-arg=--max-running=4"])
    entries = [
        Entry("qwen3:8b", "/models/qwen3-8b.gguf", ModelCard("qwen3:8b", 64, capabilities=["completion"])),
        Entry("smol", "/models/smol", ModelCard("smol", 64, capabilities=["completion"])),
        Entry("minilm", "/models/minilm", ModelCard("minilm", 64, capabilities=["embedding"])),
    ]
    supervisor = launcher.Launcher(config, entries=entries)
    try:
        commands = {entry.name: supervisor._worker_command("ipc:///tmp/w.sock", entry) for entry in entries}
    finally:
        supervisor._shutdown()
        shutil.rmtree(supervisor.run_dir)
    params = {name: worker_main.parse_args(command[3:]).param for name, command in commands.items()}
    assert params == {
        "qwen3:8b": ["temperature=0.3", "top_k=20", "stop=a:b=c"],  # the server-wide first: the model's own win
        "smol": ["temperature=0.3"],
        "minilm": [],  # an encoder has no generation defaults
    }
    assert worker_main.parse_args(commands["smol"][3:]).max_running == 4  # --worker-arg still goes to each
    assert parse_params(params["qwen3:8b"]) == {"temperature": 0.3, "top_k": 20, "stop": ["a:b=c"]}
    assert "--param nope:top_p=0.5: no chat model of that name is listed" in caplog.text


@pytest.mark.parametrize("param", ["qwen3:mirostat=1", "qwen3:temperature=300", ":temperature=1", "top_k"])
def test_a_bad_launcher_param_stops_the_launch(param: str) -> None:
    with pytest.raises(SystemExit):
        launcher_config.parse_args(["--device=cpu", f"--param={param}"])
