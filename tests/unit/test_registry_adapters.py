"""LoRA adapters in the supervisor's registry: listed as models with a parent, loaded by loading their base, added
and removed at run time (through the base's workers when it is loaded). Fake workers, adapter folders written here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from test_registry import FakeWorker, Harness, entry

from common.protocol import Ack, Failed, LoadAdapter, ModelCard, UnloadAdapter
from supervisor.adapters import adapter_entry
from supervisor.registry import ModelManager
from worker.catalog import Entry


def adapter_folder(folder: Path, base_model: str = "") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": base_model}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": np.zeros((2, 8), np.float32),
        f"{prefix}.lora_B.weight": np.zeros((8, 2), np.float32),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


@dataclass(eq=False)
class AdapterWorker(FakeWorker):
    sent: list[Any] = field(default_factory=list)
    replies: dict[int, Ack | Failed] = field(default_factory=dict)

    def send(self, message: LoadAdapter | UnloadAdapter, expect_reply: bool = False) -> bool:
        self.sent.append(message)
        return True


class Adapters(Harness):
    def __init__(self, tmp_path: Path, adapters: list[Entry] | None = None) -> None:
        super().__init__()
        self.tmp_path = tmp_path
        self.manager = ModelManager(
            self.entries, self.budget, self.spawn, clock=self.clock, monotonic=self.clock, adapters=adapters
        )

    def spawn(self, entry: Entry) -> list[Any]:
        worker = AdapterWorker(entry.name, f"ipc://{entry.name}")
        self.workers.setdefault(entry.name, []).append(worker)
        return [worker]

    def catalog(self) -> dict[str, str]:
        models = self.manager.state(True).models or []
        return {card.name: card.parent for card in models}


def test_the_base_is_the_model_the_adapter_names_else_the_first_chat_model(tmp_path: Path) -> None:
    embedding = Entry("e", "/e", ModelCard("e", 256, capabilities=["embedding"]))
    entries = [embedding, entry("a"), entry("b")]  # an embedding model is never a base
    assert adapter_entry("x", adapter_folder(tmp_path / "x", "org/B"), entries).card.parent == "b"
    assert adapter_entry("y", adapter_folder(tmp_path / "y", "/models/b"), entries).card.parent == "b"  # its folder
    assert adapter_entry("z", adapter_folder(tmp_path / "z", "unrelated/model"), entries).card.parent == "a"
    assert adapter_entry("w", str(tmp_path / "z"), entries, base="b").card.parent == "b"
    card = adapter_entry("v", str(tmp_path / "z"), entries).card
    assert (
        card.num_parameters == 2 * (8 + 8)
        and card.capabilities == ["completion"]
        and card.source == str(tmp_path / "z")
    )


def test_listed_after_the_models_and_loaded_through_the_base(tmp_path: Path) -> None:
    adapters = [adapter_entry("tune", adapter_folder(tmp_path / "tune", "b"), [entry("a"), entry("b")])]
    h = Adapters(tmp_path, adapters)
    assert h.catalog() == {"a": "", "b": "", "c": "", "tune": "b"}
    h.manager.load((b"g", 1), "Tune:latest", keep_alive=60)
    assert list(h.workers) == ["b"]  # the base, not a worker of its own
    h.ready("b")
    assert h.answers() == [(b"g", 1, "ok")] and h.manager.models["b"].keep_alive == 60
    h.manager.use("tune", keep_alive=-1)
    assert h.manager.models["b"].keep_alive == -1
    assert [a.name for a in h.manager.adapters.of("b")] == ["tune"] and h.manager.adapters.of("a") == []
    h.manager.unload((b"g", 2), "tune")
    assert h.states() == {"b": "unloading"}


def test_added_while_its_base_is_not_loaded_it_is_listed_at_once(tmp_path: Path) -> None:
    h = Adapters(tmp_path)
    version = h.manager.catalog_version
    h.manager.add_adapter((b"g", 1), "late", adapter_folder(tmp_path / "late"), None)
    assert h.answers() == [(b"g", 1, "ok")] and h.catalog()["late"] == "a"
    assert h.manager.catalog_version > version  # every gateway gets the new list
    assert [a.name for a in h.manager.adapters.of("a")] == ["late"]  # its next start serves it


def test_added_while_its_base_is_loaded_it_is_listed_once_every_worker_has_read_it(tmp_path: Path) -> None:
    h = Adapters(tmp_path)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.answers()
    h.manager.add_adapter((b"g", 2), "late", adapter_folder(tmp_path / "late"), None)
    worker = h.worker("a")
    [sent] = worker.sent
    assert isinstance(sent, LoadAdapter) and sent.name == "late" and sent.path == str(tmp_path / "late")
    h.manager.tick()
    assert h.answers() == [] and "late" not in h.catalog()  # not before the worker says so
    worker.replies[sent.id] = Ack(sent.id)
    h.manager.tick()
    assert h.answers() == [(b"g", 2, "ok")] and h.catalog()["late"] == "a"


def test_an_adapter_the_worker_refuses_is_not_listed_and_the_reason_comes_back(tmp_path: Path) -> None:
    h = Adapters(tmp_path)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.answers()
    h.manager.add_adapter((b"g", 2), "wrong", adapter_folder(tmp_path / "wrong"), None)
    [sent] = h.worker("a").sent
    h.worker("a").replies[sent.id] = Failed(sent.id, "bad_request", "it was trained for another model")
    h.manager.tick()
    [(waiter, answer)] = h.manager.answers
    assert answer.code == "invalid" and answer.message == "it was trained for another model"
    assert "wrong" not in h.catalog()


def test_an_adapter_added_while_its_base_loads_is_sent_once_it_is_ready(tmp_path: Path) -> None:
    h = Adapters(tmp_path)
    h.manager.load((b"g", 1), "a", None)
    h.manager.add_adapter((b"g", 2), "late", adapter_folder(tmp_path / "late"), None)
    assert h.worker("a").sent == []
    h.ready("a")
    [sent] = h.worker("a").sent
    assert isinstance(sent, LoadAdapter)


def test_names_and_folders_that_cannot_be_served_are_refused(tmp_path: Path) -> None:
    adapters = [adapter_entry("tune", adapter_folder(tmp_path / "tune"), [entry("a")])]
    h = Adapters(tmp_path, adapters)
    h.manager.add_adapter((b"g", 1), "tune", str(tmp_path / "tune"), None)
    h.manager.add_adapter((b"g", 2), "B", str(tmp_path / "tune"), None)
    h.manager.add_adapter((b"g", 3), "new", str(tmp_path / "nowhere"), None)
    h.manager.add_adapter((b"g", 4), "new", str(tmp_path / "tune"), "nope")
    messages = [answer.message for _, answer in h.manager.answers]
    assert [answer.code for _, answer in h.manager.answers] == ["invalid"] * 4
    assert "already been loaded" in messages[0] and "name of a model" in messages[1]
    assert "not found" in messages[2] and "no chat model named 'nope'" in messages[3]


def test_removed_at_run_time(tmp_path: Path) -> None:
    adapters = [adapter_entry("tune", adapter_folder(tmp_path / "tune"), [entry("a")])]
    h = Adapters(tmp_path, adapters)
    h.manager.load((b"g", 1), "a", None)
    h.ready("a")
    h.answers()
    h.manager.remove_adapter((b"g", 2), "TUNE")
    assert h.answers() == [(b"g", 2, "ok")] and "tune" not in h.catalog()
    assert [type(m) for m in h.worker("a").sent] == [UnloadAdapter]
    h.manager.remove_adapter((b"g", 3), "tune")
    [(waiter, answer)] = h.manager.answers
    assert answer.code == "not_found" and answer.message == "The lora adapter 'tune' cannot be found."
