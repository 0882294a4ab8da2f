"""LoRA adapters in the real engine on a tiny model: requests naming an adapter, adapters loaded and unloaded while
requests run, the slot limit, and the prefix cache kept apart per adapter."""

from __future__ import annotations

import copy
import queue
from pathlib import Path
from typing import Any

import msgspec
import peft
import pytest
from test_engine import PEER, Client, chat
from tiny_model import fallback_loaded, tiny_engine, tiny_loaded

from common.protocol import Ack, Done, Failed, Generate, LoadAdapter, UnloadAdapter
from worker.engine import Engine, EngineConfig
from worker.lora_slots import AdapterRead

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def adapter_dirs(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PEFT adapters of the tiny model, random B (so each changes the output)."""
    import torch

    folder = tmp_path_factory.mktemp("adapters")
    base = tiny_loaded(tokenizer).model
    for seed, name in enumerate(("one", "two")):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        model = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.mul_(50)
        model.save_pretrained(folder / name)
    return {"one": folder / "one", "two": folder / "two"}


def engine_with(tokenizer: Any, adapter_dirs: dict[str, Path], **config: Any) -> Engine:
    loras = tuple((name, str(path)) for name, path in adapter_dirs.items())
    return tiny_engine(tokenizer, max_model_len=128, loras=loras, **config)


def with_adapter(request: Generate, adapter: str | None) -> Generate:
    return msgspec.structs.replace(request, adapter=adapter)


def outputs(client: Client) -> dict[int, str]:
    return {key[1]: "".join(e.text for e in events if hasattr(e, "text")) for key, events in client.events.items()}


def test_adapters_are_listed_with_their_parent(tokenizer: Any, adapter_dirs: dict[str, Path]) -> None:
    engine = engine_with(tokenizer, adapter_dirs)
    cards = {card.name: card for card in engine.info().models}
    assert set(cards) == {"tiny", "one", "two"}
    assert cards["one"].parent == "tiny" and cards["tiny"].parent == ""
    assert cards["one"].context_length == cards["tiny"].context_length
    assert cards["one"].num_parameters == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers of q and v: r (in + out)


def test_each_request_gets_its_adapter_in_one_batch(tokenizer: Any, adapter_dirs: dict[str, Path]) -> None:
    engine = engine_with(tokenizer, adapter_dirs)
    client = Client(engine)
    client.add(chat(1, "the same prompt"))
    client.add(with_adapter(chat(2, "the same prompt"), "one"))
    client.add(with_adapter(chat(3, "the same prompt"), "two"))
    client.run()
    ends = client.ends()
    assert all(isinstance(end[0], Done) for end in ends.values()), ends
    texts = outputs(client)
    assert len({texts[1], texts[2], texts[3]}) == 3, texts  # three models, three answers

    alone = Client(engine_with(tokenizer, adapter_dirs))  # each alone in a fresh engine: the same answers
    for request_id, adapter in ((1, None), (2, "one"), (3, "two")):
        alone.add(with_adapter(chat(request_id, "the same prompt"), adapter))
        alone.run()
    assert outputs(alone) == texts


def test_unknown_and_broken_adapters_are_refused(tokenizer: Any, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tokenizer, max_model_len=128, loras=(("broken", str(tmp_path)),))
    client = Client(engine)
    client.add(with_adapter(chat(1), "nope"), admit=False)
    client.add(with_adapter(chat(2), "broken"), admit=False)
    ends = client.ends()
    assert ends[PEER, 1] == [Failed(id=1, code="not_found", message="nope")]
    assert ends[PEER, 2][0].code == "bad_request" and "not a PEFT adapter folder" in ends[PEER, 2][0].message
    assert [card.name for card in engine.info().models] == ["tiny"]  # a broken adapter is not listed


def test_a_model_on_the_fallback_path_refuses_adapters_and_still_serves(
    tokenizer: Any, adapter_dirs: dict[str, Path]
) -> None:
    loras = (("one", str(adapter_dirs["one"])),)
    engine = Engine(fallback_loaded(tokenizer, "gpt2"), EngineConfig(kv_cache_bytes=8 << 20, loras=loras))
    client = Client(engine)
    client.add(with_adapter(chat(1), "one"), admit=False)
    client.add(chat(2, max_tokens=3))
    client.run()
    ends = client.ends()
    assert ends[PEER, 1][0].code == "bad_request" and "native runner only" in ends[PEER, 1][0].message
    assert [type(end) for end in ends[PEER, 2]] == [Done]


def test_the_prefix_cache_is_kept_apart_per_adapter(tokenizer: Any, adapter_dirs: dict[str, Path]) -> None:
    engine = engine_with(tokenizer, adapter_dirs)
    client = Client(engine)
    prompt = "a long shared prompt " * 8
    client.add(chat(1, prompt, max_tokens=1))
    client.run()
    cached = []
    for request_id, adapter in ((2, "one"), (3, "one"), (4, None)):
        client.add(with_adapter(chat(request_id, prompt, max_tokens=1), adapter))
        client.run()
        cached.append(client.ends()[PEER, request_id][0].usage.cached_tokens)
    assert cached[0] == 0, "the base model's KV was served to an adapter"
    assert cached[1] > 0 and cached[2] > 0  # each reuses its own


def test_a_full_slot_table_refuses_and_then_evicts_the_idle_adapter(
    tokenizer: Any, adapter_dirs: dict[str, Path]
) -> None:
    engine = engine_with(tokenizer, adapter_dirs, max_loras=1)
    client = Client(engine)
    client.add(with_adapter(chat(1, max_tokens=20), "one"))
    client.take(engine.step())
    client.add(with_adapter(chat(2), "two"))  # "one" holds the only slot
    failed = client.ends()[PEER, 2]
    assert failed[0].code == "busy" and "--max-loras" in failed[0].message
    client.run()
    client.add(with_adapter(chat(3), "two"))  # "one" is idle now: evicted
    client.run()
    assert isinstance(client.ends()[PEER, 3][0], Done)
    assert engine.runner.loras[1] is not None and engine.runner.loras[1].name == "two"


class Loader:
    """Plays the server's part for LoadAdapter: the intake thread's AdapterRead comes back through a queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ready: queue.Queue[AdapterRead] = queue.Queue()

    def load(self, request_id: int, name: str, path: Path | str) -> Any:
        assert self.engine.load_adapter(PEER, LoadAdapter(request_id, name, str(path)), self.ready.put) == []
        [(peer, answer)] = self.engine.adapter_read(PEER, self.ready.get(timeout=30))
        return answer

    def unload(self, request_id: int, name: str) -> Any:
        [(peer, answer)] = self.engine.unload_adapter(PEER, UnloadAdapter(request_id, name))
        return answer


def test_load_and_unload_at_run_time(tokenizer: Any, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tokenizer, max_model_len=128)
    loader = Loader(engine)
    assert loader.load(1, "late", adapter_dirs["one"]) == Ack(1)
    assert [card.name for card in engine.info().models] == ["tiny", "late"]
    client = Client(engine)
    client.add(with_adapter(chat(10, max_tokens=30), "late"))
    client.take(engine.step())
    assert loader.unload(2, "late") == Ack(2)  # while a request runs with it
    assert [card.name for card in engine.info().models] == ["tiny"]
    client.add(with_adapter(chat(11), "late"), admit=False)
    assert client.ends()[PEER, 11] == [Failed(id=11, code="not_found", message="late")]
    assert engine.runner.loras[1] is not None  # still in memory for request 10
    client.run()
    assert isinstance(client.ends()[PEER, 10][0], Done)
    assert client.ends()[PEER, 10][0].usage.completion_tokens == 30
    assert engine.runner.loras[1] is None  # its last request is done: freed

    assert loader.unload(3, "late") == Failed(id=3, code="not_found", message="late")
    bad = loader.load(4, "bad", tmp_path)
    assert bad.code == "bad_request" and "not a PEFT adapter folder" in bad.message
    clash = loader.load(5, "TINY", adapter_dirs["one"])
    assert clash.code == "bad_request" and "name of the model itself" in clash.message


def test_a_failing_admission_gives_back_its_adapter(
    tokenizer: Any, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_engine(tokenizer, max_model_len=128)
    loader = Loader(engine)
    assert loader.load(1, "late", adapter_dirs["one"]) == Ack(1)
    client = Client(engine)
    client.add(with_adapter(chat(10), "late"), admit=False)
    assert loader.unload(2, "late") == Ack(2)  # while the request is at intake: its admission places it last

    def fails(seq: Any) -> None:
        raise RuntimeError("simulated scheduler bug")

    monkeypatch.setattr(engine.scheduler, "add", fails)
    client.take(engine.admit(client.ready.get(timeout=30)))
    [end] = client.ends()[PEER, 10]
    assert isinstance(end, Failed) and end.code == "internal" and "simulated scheduler bug" in end.message
    assert engine.runner.loras[1] is None and not engine.adapters.slots.resident  # the unloaded adapter's memory freed
    assert not engine.has_work() and not engine.preparing
