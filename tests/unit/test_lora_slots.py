"""The LoRA slot table (worker/lora_slots.py): registration by name, placement, least-recently-used eviction that
never takes an adapter a request holds. Plain Python, no model."""

from __future__ import annotations

import pytest

from worker.lora_slots import AdapterSlots, NoFreeSlot


def test_names_match_as_model_names_do() -> None:
    slots = AdapterSlots(2)
    adapter = slots.register("Tune", "/a")
    assert slots.find("tune:latest") == adapter and slots.find("other") is None


def test_free_slots_first_then_the_least_recently_used_idle_adapter() -> None:
    slots = AdapterSlots(2)
    a, b, c = (slots.register(name, f"/{name}") for name in "abc")
    assert slots.place(a.id, in_use=()) == (1, None)
    assert slots.place(b.id, in_use=()) == (2, None)
    assert slots.slot(a.id) == 1  # a is used again: b is now the least recently used
    assert slots.place(c.id, in_use=()) == (2, b.id)
    assert slots.slot(b.id) is None and slots.slot(c.id) == 2


def test_an_adapter_in_use_is_never_evicted() -> None:
    slots = AdapterSlots(2)
    a, b, c = (slots.register(name, f"/{name}") for name in "abc")
    slots.place(a.id, in_use=())
    slots.place(b.id, in_use=())
    assert slots.place(c.id, in_use={a.id}) == (2, b.id)  # a is older, but held
    with pytest.raises(NoFreeSlot, match="--max-loras"):
        slots.place(b.id, in_use={a.id, c.id})
    assert dict(slots.resident) == {a.id: 1, c.id: 2}  # a refusal changes nothing


def test_unloaded_adapters_go_first_and_are_reclaimed_once_unused() -> None:
    slots = AdapterSlots(2)
    a, b = slots.register("a", "/a"), slots.register("b", "/b")
    slots.place(a.id, in_use=())
    slots.place(b.id, in_use=())
    slots.slot(a.id)
    slots.unregister("a")  # still running somewhere
    assert slots.has_stale
    assert slots.reclaim(in_use={a.id}) == [] and slots.has_stale
    c = slots.register("c", "/c")
    assert slots.place(c.id, in_use=()) == (1, a.id)  # the unloaded one, though b is older
    slots.unregister("b")
    assert slots.reclaim(in_use=()) == [2] and not slots.has_stale and slots.has_free


def test_a_name_loaded_again_is_a_new_adapter() -> None:
    """New weights under an old name: a new id, so neither its slot nor its prefix-cache entries are the old ones'."""
    slots = AdapterSlots(2)
    first = slots.register("a", "/v1")
    slots.place(first.id, in_use=())
    second = slots.register("a", "/v2")
    assert second.id != first.id and slots.find("a") == second and slots.slot(second.id) is None
    assert slots.has_stale and slots.reclaim(in_use=()) == [1]


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        AdapterSlots(0)
